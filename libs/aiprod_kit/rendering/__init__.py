"""The renderer kit: everything a provider renderer needs that is not provider-specific."""

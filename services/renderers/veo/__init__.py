"""The Veo renderer: Veo on Vertex AI through the google-genai client (long-running predict operations)."""

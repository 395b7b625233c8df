"""The Runway renderer: Runway's task API through the official runwayml client."""

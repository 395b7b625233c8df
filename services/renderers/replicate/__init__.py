"""The Replicate renderer: a configured Replicate video model's predictions through the official
replicate client."""

"""The local renderer: synthetic but real H.264 videos from prompts, made on this machine."""

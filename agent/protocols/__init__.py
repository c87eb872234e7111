"""Pure byte parsers and encoders for the devices the agent talks to."""

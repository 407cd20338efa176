"""The demo app: a chat with an agent whose answers survive dropped connections."""

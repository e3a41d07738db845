"""The file names of a plugin checkpoint folder (shared by every architecture's loader)."""

MANIFEST = "odedit_model.json"  # its presence makes a folder a plugin checkpoint
WEIGHTS = "model.safetensors"

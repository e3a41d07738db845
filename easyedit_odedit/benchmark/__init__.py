"""MiniMMEdit: the project's multimodal editing benchmark built on easy-vqa (see world.py)."""

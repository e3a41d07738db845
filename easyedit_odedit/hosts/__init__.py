"""Host editing methods ODEdit decorates (one module a family)."""

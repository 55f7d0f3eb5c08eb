"""Headless execution of ComfyUI graphs (embedded executor, and later the oboro-run CLI)."""

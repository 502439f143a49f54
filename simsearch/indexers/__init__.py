"""Turning folders (or streams of files) into rows of the store."""

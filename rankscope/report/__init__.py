"""Renderers: each turns analysis records into one string; they compute nothing new."""

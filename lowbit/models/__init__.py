"""Model definition and loading."""

"""Studies: one file each, taking a config and writing result files. ``report`` holds what they share."""

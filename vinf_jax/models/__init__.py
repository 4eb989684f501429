"""The three models of a VideoCrafter2 checkpoint, one per file."""

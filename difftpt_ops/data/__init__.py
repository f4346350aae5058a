"""Dataset formats, class names and image reading. No database, no torch."""

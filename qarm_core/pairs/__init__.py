"""Stage 1: mining item pairs (Swing item-to-item, two-tower user-to-item)."""

"""The draft service: the small model proposes token trees."""

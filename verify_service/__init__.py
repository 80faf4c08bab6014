"""The verify service: the target model checks draft trees in one forward pass."""

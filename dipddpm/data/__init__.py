"""Data sources: single images, MNIST digits, 32x32 colour images."""

"""Training data: Real-ESRGAN degradations, image sources with a bad-input policy, the grain pipeline."""

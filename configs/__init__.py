"""Training configs: ``configs/<method>.py`` with ``get_config(variant)``; shared pieces in ``common``."""

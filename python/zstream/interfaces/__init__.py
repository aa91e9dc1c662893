"""What people run: the ``zstream`` command (``cli``), its ``demo`` and ``bench``."""

"""``python -m convert_weights``: see :mod:`convert_weights`."""
import sys

from convert_weights import main

if __name__ == '__main__':
  sys.exit(main())

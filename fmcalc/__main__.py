import sys

from ._cli import main


# Guarded, so that importing the package's modules (as the documentation build
# does) does not run the command line.
if __name__ == "__main__":
    sys.exit(main())

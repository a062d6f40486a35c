"""The container's fixed entrypoint: `python entrypoint.py [IMAGES_DIR OUTPUT_FILE CLASS CHECKPOINT] [options]`.

With no arguments it reads /input and writes /output/predictions.csv; `--help` lists every option.
"""

import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())

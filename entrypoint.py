"""The container's fixed entrypoint: `python entrypoint.py [IMAGES_DIR OUTPUT_FILE CLASS CHECKPOINT] [options]`.

With no arguments it reads /input and writes /output/predictions.csv; `--help` lists every option.
"""

from harness.cli import entry

if __name__ == "__main__":
    entry()

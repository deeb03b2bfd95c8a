"""Copy the labeled movie-review sentences that ship inside gensim to a path of your choice.

    python examples/demo_data.py runs/demo/pang_lee_polarity.txt

The file is fastText style (`__label__pos some text`), 200 sentences, two classes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import gensim

source = Path(gensim.__file__).parent / "test" / "test_data" / "pang_lee_polarity.cor"
target = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/pang_lee_polarity.txt")
target.parent.mkdir(parents=True, exist_ok=True)
shutil.copyfile(source, target)
print(target)

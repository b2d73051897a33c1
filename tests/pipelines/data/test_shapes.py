import numpy as np

from pipelines.data import shapes


def test_factor_grid_matches_dsprites():
    assert shapes.FACTOR_SIZES == (3, 6, 40, 32, 32)
    assert shapes.NUM_COMBINATIONS == 737_280
    assert np.allclose(shapes.FACTOR_VALUES["scale"], np.linspace(0.5, 1.0, 6))
    orientation = np.array(shapes.FACTOR_VALUES["orientation"])
    assert orientation.min() == 0.0 and orientation.max() < 2 * np.pi and len(set(orientation)) == 40
    assert shapes.FACTOR_VALUES["pos_x"][0] == 0.0 and shapes.FACTOR_VALUES["pos_x"][-1] == 1.0


def test_flat_index_round_trip():
    flat = np.array([0, 1, 12345, 737_279])
    idx = shapes.factor_indices(flat)
    assert np.array_equal(np.ravel_multi_index(idx.T, shapes.FACTOR_SIZES), flat)


def _image(shape=0, scale=5, orientation=0, x=16, y=16):
    return shapes.render(np.array([[shape, scale, orientation, x, y]]))[0]


def test_images_are_binary_and_factors_move_pixels():
    img = _image()
    assert img.shape == (64, 64) and set(np.unique(img)) <= {0, 255}
    # scale grows the area, position moves the centroid, shape changes the mask
    assert (_image(scale=5) > 0).sum() > 2 * (_image(scale=0) > 0).sum()
    cols = lambda im: np.nonzero(im)[1].mean()
    rows = lambda im: np.nonzero(im)[0].mean()
    assert cols(_image(x=0)) < cols(_image(x=16)) < cols(_image(x=31))
    assert rows(_image(y=0)) < rows(_image(y=31))
    assert not np.array_equal(_image(shape=0), _image(shape=1))
    assert not np.array_equal(_image(shape=1), _image(shape=2))
    # a quarter turn of a square is (nearly) the same square; an eighth turn is not
    assert not np.array_equal(_image(orientation=0), _image(orientation=5))


def test_shapes_stay_inside_the_frame_at_the_largest_scale():
    for shape in range(3):
        for corner in (0, 31):
            img = _image(shape=shape, scale=5, x=corner, y=corner)
            assert (img > 0).sum() > 50

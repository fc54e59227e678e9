"""The package list, which pyproject.toml cannot express: mmjax and its subpackages found
in the checkout, plus its top-level `experiments/` folder installed as `mmjax.experiments`
(so that `python -m mmjax.launch --config=mnist_lenet` works from a wheel)."""
import setuptools

setuptools.setup(
    packages=setuptools.find_packages(include=["mmjax", "mmjax.*"]) + ["mmjax.experiments"],
    package_dir={"mmjax.experiments": "experiments"},
)

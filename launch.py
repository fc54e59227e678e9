r"""Runs one experiment from a checkout: python launch.py --config=experiments/X.py[:arg] --workdir=DIR.

The same command as `python -m mmjax.launch` and `mmjax-launch` (mmjax/launch.py has
the flags and what they do).
"""
from mmjax import launch

if __name__ == "__main__":
  launch.run()

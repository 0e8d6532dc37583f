"""``python -m meshredirect.cni``: the same as the ``meshredirect-cni`` executable."""

from meshredirect.cni.main import entry

if __name__ == "__main__":
    entry()

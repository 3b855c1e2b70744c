"""streamlabel: label live text streams in milliseconds."""

__version__ = "0.1.0"

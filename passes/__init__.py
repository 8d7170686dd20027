"""fxprune subpackage."""

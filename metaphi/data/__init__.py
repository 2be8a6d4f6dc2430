"""Data files shipped inside the package (see DIGITS-LICENSE.txt)."""

"""Architecture search on one data set: a cell-based space of small conv nets (``space``), DARTS
(``darts``), REINFORCE, regularized evolution and random search (``blackbox``), and training a
network of the space from scratch (``child``). Submodules are imported when used."""

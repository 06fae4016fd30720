"""closewait lab: the article turned into experiments on this kernel (see docs/lab.md)."""

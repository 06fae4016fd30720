"""closewait's pytest plugin (entry point ``pytest11``). Inactive unless asked for."""

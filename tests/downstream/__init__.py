"""A downstream project's tests: what a mesh team writes with meshredirect's public testing toolkit."""

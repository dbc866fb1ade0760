"""iCBS: post-training pruning by the iterative Combinatorial Brain Surgeon."""

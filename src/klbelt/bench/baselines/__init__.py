"""Other frameworks' trainers driven on the same work as klbelt's, one module per framework."""

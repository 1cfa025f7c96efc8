"""The provider catalog: which model, where, and which secret holds its key."""

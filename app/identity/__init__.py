"""Identity: orgs, users, memberships, invitations, API tokens and web sessions."""

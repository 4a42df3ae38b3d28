"""Channel rules: how each op moves, couples, contracts or freezes channel labels."""

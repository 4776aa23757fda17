"""tokensieve.adapters"""

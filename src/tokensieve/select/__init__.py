"""tokensieve.select"""

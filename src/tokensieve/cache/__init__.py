"""tokensieve.cache"""

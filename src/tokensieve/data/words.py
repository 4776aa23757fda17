"""Fixed English word lists for the synthetic tasks (keys of needles, word-frequency lists).

Fixed lists (not a system dictionary) so that every machine generates the same samples.
"""

from __future__ import annotations

_NOUNS = """
    apple anchor arrow autumn badge bakery balloon banana barn basket beach beacon bell bench bicycle blanket
    bottle bridge brook bucket butter cabin cactus camera candle canyon carpet castle cedar chair cherry chimney
    cloud clover coffee comet compass copper cottage cotton crayon cricket crown crystal curtain daisy desert
    diamond dolphin door dragon drum eagle engine falcon feather fence ferry fiddle field flame flute forest
    fountain fox garden garlic giraffe glacier globe goose granite guitar hammer harbor harvest hat hazel helmet
    hill honey horizon horse island ivory jacket jasmine jelly kettle kite ladder lagoon lamp lantern lemon
    library lighthouse lily lion lizard magnet mango maple marble meadow melon mirror mitten monkey moon mountain
    needle nest ocean olive onion orchard otter owl oyster paddle palace panda paper parrot peach pebble pencil
    pepper piano pillow pine planet plum pocket pond potato pumpkin puzzle quarry quilt rabbit radio rainbow
    raven ribbon river robin rocket rose saddle sailor salmon sandal satchel scarf shadow shell shovel silver
    sparrow spider spoon squirrel stable star statue stone storm stream summit sunflower swan table teapot
    temple thimble thunder tiger timber tomato tower tractor trumpet tulip tunnel turtle umbrella valley velvet
    violin volcano wagon walnut whistle willow window winter wizard wolf yacht zebra acorn album almond atlas
    bamboo banner basil beetle biscuit blossom boulder bramble breeze cabbage canoe caramel carrot cathedral
    chestnut cinnamon citadel cobalt coral cradle cypress dune ember emerald fjord flannel forge galaxy geyser
    glove gravel hammock hedge heron iceberg igloo juniper kernel lantana lavender ledger lemonade locket lotus
    mantle marsh meteor mosaic nectar nutmeg oasis orbit paprika pasture pavilion pearl pendant pepperoni
    pilgrim plateau porcelain prairie quartz raft reef saffron sapphire scroll sequoia sherbet sleigh spruce
    sundial tapestry thistle tornado trellis truffle tundra turnip vanilla vineyard walrus wheat wreath
"""

_ADJECTIVES = """
    ancient bitter bold brave bright calm careful cheerful clever cold curious damp dark eager early elegant
    empty faint fancy fierce flat fresh gentle giant glad golden grand green happy heavy hidden hollow humble
    icy jolly keen kind large late lazy little lively lonely loud lucky mellow merry mighty misty modern narrow
    neat noble odd old pale patient plain polite proud quick quiet rapid rare rich rough round royal rusty sandy
    scarlet sharp shiny silent simple sleepy slow small smooth soft solid sour spare steady sticky stormy strange
    sunny swift tall tame tender thick tidy tiny tough vast velvet warm wary wide wild windy wise witty young
"""

NOUNS: tuple[str, ...] = tuple(_NOUNS.split())
ADJECTIVES: tuple[str, ...] = tuple(_ADJECTIVES.split())

VERBS: tuple[str, ...] = (
    "follows",
    "watches",
    "carries",
    "finds",
    "crosses",
    "passes",
    "guards",
    "circles",
    "leaves",
    "reaches",
)

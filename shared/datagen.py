"""Vitrine's own seeded generator of a realistic retail dataset.

Why it exists: every offline step (embedding, index build, ranker training,
evaluation) must run on a fresh machine with no download, and tests need data
whose structure is known. This module builds a catalogue of retail items with
short, category-appropriate texts, a user table, and a stream of
view / cart / purchase events in sessions, all from one
``numpy.random.default_rng(seed)`` so the same config always gives the same
arrays.

The events are driven by hidden user tastes that are *not* written to the
dataset (favourite categories, favourite brands, a brand tier, a price level,
a colour, an activity level, a main device). Items are chosen with a
probability that grows with category match, brand match, tier match, price
fit, item popularity and item freshness, so a model that learns those
affinities beats chance by a clear margin, which is what makes the dataset
useful for evaluating retrieval and ranking.

Timestamps are treated as the local time of a single market (hour of day is
``(t // 3600) % 24``); the daily rhythm peaks in the evening.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.data import (
    DEVICES,
    EVENT_CODE,
    Catalog,
    Dataset,
    Events,
    FloatArray,
    Int32Array,
    IntArray,
    StrArray,
    Users,
    save_dataset,
)

__all__ = [
    "CATEGORIES",
    "MULTI_CATEGORY_BRANDS",
    "TIERS",
    "CategorySpec",
    "GeneratorConfig",
    "Noun",
    "generate",
    "write_default_dataset",
]

BoolArray = npt.NDArray[np.bool_]

DAY = 86_400
HOUR = 3_600

VIEW_CODE = EVENT_CODE["view"]
CART_CODE = EVENT_CODE["cart"]
PURCHASE_CODE = EVENT_CODE["purchase"]


@dataclass(frozen=True)
class GeneratorConfig:
    """Sizes and seed of a generated dataset.

    ``n_events`` is a target: the generator plans the number of views from it and
    the funnel adds carts and purchases, so the actual count lands within a few
    percent. ``start`` is fixed (not "now") so the output is deterministic.
    """

    seed: int = 7
    n_items: int = 10_000
    n_users: int = 3_000
    n_events: int = 220_000
    days: int = 90
    start: int = 1_780_000_000

    def validate(self) -> None:
        """Fail early with a readable message instead of deep inside numpy."""
        if self.n_items < 100:
            raise ValueError(f"n_items must be >= 100 (every category needs items), got {self.n_items}")
        if self.n_users < 1:
            raise ValueError(f"n_users must be >= 1, got {self.n_users}")
        if self.n_events < 100:
            raise ValueError(f"n_events must be >= 100, got {self.n_events}")
        if self.days < 1:
            raise ValueError(f"days must be >= 1, got {self.days}")
        if self.start < 0:
            raise ValueError(f"start must be unix seconds >= 0, got {self.start}")


# --------------------------------------------------------------------------------------
# Vocabulary. Every category carries its own nouns, tones (mostly colours), materials,
# variants and description phrases, so a title and description read like one product and
# sentence embeddings of related items land close together.
# --------------------------------------------------------------------------------------

TIERS: tuple[str, ...] = ("budget", "mid", "premium")
"""Brand tiers; the position is the tier code."""

TIER_PRICE_FACTOR: tuple[float, ...] = (0.6, 1.0, 1.8)
"""How a brand's tier scales the price of its items."""

TIER_AFFINITY: tuple[tuple[float, ...], ...] = (
    # item tier:  budget  mid   premium     (rows: the user's preferred tier)
    (1.6, 1.0, 0.45),
    (0.9, 1.4, 0.9),
    (0.45, 1.0, 1.6),
)
"""Multiplier on an item's appeal given the user's preferred tier and the item's tier."""


@dataclass(frozen=True)
class Noun:
    """A product noun, its price relative to the category, and materials that fit it.

    ``materials`` overrides the category's materials where the generic ones would read
    wrong ("plush plush bear", "cork dumbbell set").
    """

    name: str
    price_factor: float = 1.0
    materials: tuple[str, ...] = ()


@dataclass(frozen=True)
class CategorySpec:
    """Everything needed to write believable items of one category."""

    name: str
    share: float  # relative catalogue size and traffic
    price_range: tuple[float, float]  # typical mid-tier price span
    nouns: tuple[Noun, ...]
    tones: tuple[str, ...]  # colours, or finishes/claims where colour makes no sense
    materials: tuple[str, ...]
    variants: tuple[str, ...]  # already in title case
    adjectives: tuple[str, ...]
    features: tuple[str, ...]
    uses: tuple[str, ...]  # one short sentence each
    brands: tuple[tuple[str, str], ...]  # (brand, tier)


CATEGORIES: tuple[CategorySpec, ...] = (
    CategorySpec(
        name="handbags",
        share=1.1,
        price_range=(35.0, 420.0),
        nouns=(
            Noun("tote", 1.0),
            Noun("crossbody bag", 0.8),
            Noun("clutch", 0.6),
            Noun("shoulder bag", 1.0),
            Noun("satchel", 1.15),
            Noun("bucket bag", 0.9),
            Noun("hobo bag", 0.9),
            Noun("purse", 0.6),
        ),
        tones=("black", "tan", "cognac", "navy", "burgundy", "cream", "olive", "brown"),
        materials=("leather", "pebbled leather", "vegan leather", "suede", "canvas", "quilted nylon"),
        variants=("Mini", "Large", "Zip-Top", "Top-Handle", "Everyday", "Convertible"),
        adjectives=("structured", "slouchy", "compact", "roomy", "timeless", "minimalist"),
        features=(
            "an adjustable strap",
            "a magnetic snap closure",
            "an interior zip pocket",
            "gold-tone hardware",
            "a detachable pouch",
            "a padded phone sleeve",
        ),
        uses=(
            "Fits a tablet, wallet and daily essentials.",
            "Made for commutes, errands and evenings out.",
            "Pairs easily with workwear or weekend outfits.",
        ),
        brands=(
            ("Maison Verre", "premium"),
            ("Calder & Finch", "premium"),
            ("Lune Atelier", "mid"),
            ("Totewell", "mid"),
            ("Strand & Hide", "mid"),
            ("Pocketry", "budget"),
        ),
    ),
    CategorySpec(
        name="sneakers",
        share=1.1,
        price_range=(40.0, 210.0),
        nouns=(
            Noun("low-top sneaker", 1.0),
            Noun("high-top sneaker", 1.1),
            Noun("slip-on sneaker", 0.8),
            Noun("court sneaker", 1.0),
            Noun("platform sneaker", 1.1),
            Noun("skate shoe", 0.8),
        ),
        tones=("white", "black", "grey", "navy", "cream", "green", "red"),
        materials=("leather", "canvas", "suede", "knit", "recycled mesh"),
        variants=("Classic", "Retro", "Low", "Everyday", "Limited Edition"),
        adjectives=("clean", "retro", "chunky", "lightweight", "versatile"),
        features=(
            "a cushioned insole",
            "a grippy rubber outsole",
            "a padded collar",
            "contrast stitching",
            "a reinforced toe cap",
            "flat cotton laces",
        ),
        uses=(
            "Built for all-day wear around town.",
            "An easy match for jeans and casual outfits.",
            "A streetwear staple that goes with everything.",
        ),
        brands=(
            ("Vantello", "premium"),
            ("Stride Theory", "mid"),
            ("Haskett", "mid"),
            ("Courtside Co", "mid"),
            ("Kicklane", "budget"),
        ),
    ),
    CategorySpec(
        name="running shoes",
        share=0.9,
        price_range=(55.0, 230.0),
        nouns=(
            Noun("road running shoe", 1.0),
            Noun("trail running shoe", 1.1),
            Noun("racing flat", 1.3),
            Noun("stability shoe", 1.1),
            Noun("cushioned trainer", 1.0),
        ),
        tones=("black", "white", "blue", "orange", "grey", "coral", "volt"),
        materials=("engineered mesh", "knit", "breathable mesh", "waterproof mesh"),
        variants=("Pro", "V2", "Max Cushion", "GTX", "Wide Fit"),
        adjectives=("responsive", "lightweight", "supportive", "springy", "durable"),
        features=(
            "a foam midsole",
            "a carbon plate",
            "a breathable upper",
            "a lugged outsole",
            "a firm heel counter",
            "reflective details",
        ),
        uses=(
            "Designed for daily miles and long runs.",
            "Ready for race day and tempo sessions.",
            "Grips wet roads and rocky trails.",
        ),
        brands=(
            ("Aerolope", "premium"),
            ("Summit Run", "premium"),
            ("TrailForge", "mid"),
            ("Pacewell", "mid"),
            ("Stridekit", "budget"),
        ),
    ),
    CategorySpec(
        name="jackets",
        share=1.0,
        price_range=(45.0, 480.0),
        nouns=(
            Noun("puffer jacket", 1.2, ("down-filled", "recycled polyester", "quilted nylon")),
            Noun("rain jacket", 0.9, ("waterproof nylon", "recycled polyester", "ripstop")),
            Noun("bomber jacket", 0.9),
            Noun("parka", 1.5, ("down-filled", "waxed cotton", "waterproof nylon")),
            Noun("field jacket", 1.0),
            Noun("biker jacket", 1.6, ("leather", "suede", "vegan leather")),
            Noun("trucker jacket", 0.8, ("denim", "corduroy", "waxed cotton")),
            Noun("fleece jacket", 0.6, ("sherpa", "polar", "recycled")),
        ),
        tones=("black", "olive", "navy", "camel", "charcoal", "red", "sand"),
        materials=("nylon", "recycled polyester", "waxed cotton", "wool blend", "leather"),
        variants=("Hooded", "Cropped", "Longline", "Packable", "Insulated"),
        adjectives=("warm", "weatherproof", "lightweight", "tailored", "rugged"),
        features=(
            "a detachable hood",
            "sealed seams",
            "zip hand pockets",
            "a two-way zipper",
            "a soft fleece lining",
            "adjustable cuffs",
        ),
        uses=(
            "Keeps you warm on cold commutes.",
            "Built for wind, rain and changing weather.",
            "Layers easily over knits and hoodies.",
        ),
        brands=(
            ("Fjellmark", "premium"),
            ("Alder Peak", "premium"),
            ("Harbor & Pine", "mid"),
            ("Outerwise", "mid"),
            ("Coldline", "budget"),
        ),
    ),
    CategorySpec(
        name="dresses",
        share=1.2,
        price_range=(25.0, 260.0),
        nouns=(
            Noun("midi dress", 1.0),
            Noun("maxi dress", 1.1),
            Noun("wrap dress", 1.0),
            Noun("slip dress", 0.9),
            Noun("shirt dress", 0.9),
            Noun("sundress", 0.7),
            Noun("sheath dress", 1.1),
            Noun("sweater dress", 1.0, ("merino knit", "cashmere blend", "rib knit")),
        ),
        tones=("black", "ivory", "emerald", "blush", "navy", "terracotta", "lilac"),
        materials=("linen", "satin", "cotton poplin", "jersey", "crepe", "chiffon"),
        variants=("Sleeveless", "Long Sleeve", "Belted", "Tiered", "Smocked"),
        adjectives=("flowy", "elegant", "tailored", "relaxed", "flattering"),
        features=(
            "a V-neckline",
            "a tie waist",
            "side pockets",
            "a fully lined skirt",
            "puff sleeves",
            "a hidden back zip",
        ),
        uses=(
            "Perfect for weddings, dinners and summer events.",
            "Dresses up or down from office to evening.",
            "An easy one-piece outfit for warm days.",
        ),
        brands=(
            ("Rosalind", "premium"),
            ("Atelier Sola", "premium"),
            ("Wren & Ivy", "mid"),
            ("Fable Street", "mid"),
            ("Daisy Row", "budget"),
        ),
    ),
    CategorySpec(
        name="jeans",
        share=0.9,
        price_range=(28.0, 190.0),
        nouns=(
            Noun("skinny jeans", 1.0),
            Noun("straight-leg jeans", 1.0),
            Noun("bootcut jeans", 1.0),
            Noun("wide-leg jeans", 1.05),
            Noun("relaxed jeans", 0.95),
            Noun("slim jeans", 1.0),
            Noun("mom jeans", 0.95),
        ),
        tones=("indigo", "black", "grey", "ecru", "stonewash", "dark-wash"),
        materials=("stretch denim", "rigid denim", "selvedge denim", "organic cotton", "recycled denim"),
        variants=("High-Rise", "Mid-Rise", "Cropped", "Distressed", "Tapered"),
        adjectives=("classic", "comfortable", "flattering", "durable", "vintage-inspired"),
        features=(
            "a five-pocket design",
            "a button fly",
            "a raw hem",
            "a touch of stretch",
            "reinforced rivets",
            "a contoured waistband",
        ),
        uses=(
            "An everyday pair that softens with every wear.",
            "Goes with sneakers, boots and everything between.",
            "Cut for comfort from morning to night.",
        ),
        brands=(
            ("Rivet & Loom", "premium"),
            ("Indigo Ash", "premium"),
            ("Bluefield Denim", "mid"),
            ("Canyon Thread", "mid"),
            ("Denimday", "budget"),
        ),
    ),
    CategorySpec(
        name="headphones",
        share=0.8,
        price_range=(18.0, 420.0),
        nouns=(
            Noun("over-ear headphones", 1.4),
            Noun("on-ear headphones", 1.0),
            Noun("wireless earbuds", 0.9),
            Noun("sport earbuds", 0.7),
            Noun("studio headphones", 1.3),
            Noun("gaming headset", 1.0),
        ),
        tones=("black", "white", "silver", "graphite", "midnight", "sage"),
        materials=("noise-cancelling", "Bluetooth", "wired", "open-back", "low-latency"),
        variants=("Pro", "Lite", "Gen 2", "Max", "Plus"),
        adjectives=("immersive", "comfortable", "compact", "powerful", "balanced"),
        features=(
            "active noise cancellation",
            "40-hour battery life",
            "a built-in microphone",
            "fast USB-C charging",
            "memory-foam cushions",
            "multipoint pairing",
        ),
        uses=(
            "Great for commutes, flights and focused work.",
            "Delivers deep bass and clear calls.",
            "Stays secure through workouts and runs.",
        ),
        brands=(
            ("Sonique", "premium"),
            ("Auralis", "premium"),
            ("Bassline Audio", "mid"),
            ("Quietwave", "mid"),
            ("Tunebud", "budget"),
            ("Echonix", "budget"),
        ),
    ),
    CategorySpec(
        name="coffee makers",
        share=0.6,
        price_range=(20.0, 700.0),
        nouns=(
            Noun("espresso machine", 3.0),
            Noun("drip coffee maker", 0.8),
            Noun("french press", 0.35, ("borosilicate glass", "stainless steel")),
            Noun("pour-over dripper", 0.3, ("ceramic", "borosilicate glass", "stainless steel")),
            Noun("cold brew maker", 0.45, ("borosilicate glass", "BPA-free plastic")),
            Noun("bean-to-cup machine", 4.0),
            Noun("moka pot", 0.35, ("aluminium", "stainless steel")),
            Noun("milk frother", 0.4),
        ),
        tones=("black", "silver", "white", "red", "copper", "matte"),
        materials=("stainless steel", "brushed aluminium", "chrome"),
        variants=("12-Cup", "Compact", "Deluxe", "Programmable", "Barista Edition"),
        adjectives=("compact", "precise", "easy-to-clean", "elegant", "reliable"),
        features=(
            "an easy-clean design",
            "a small footprint",
            "a reusable filter",
            "a heat-retaining build",
            "a clear water window",
            "a cool-touch handle",
        ),
        uses=(
            "Brews cafe-quality coffee at home.",
            "Makes mornings quicker with rich, hot coffee.",
            "Ideal for espresso, lattes and cappuccinos.",
        ),
        brands=(
            ("Brewmere", "premium"),
            ("Crema Casa", "premium"),
            ("Kettleby", "mid"),
            ("Roastwell", "mid"),
            ("Daybrew", "budget"),
        ),
    ),
    CategorySpec(
        name="cookware",
        share=0.8,
        price_range=(15.0, 380.0),
        nouns=(
            Noun("frying pan", 0.6),
            Noun("saucepan", 0.7),
            Noun("dutch oven", 1.6, ("enameled cast iron", "cast iron")),
            Noun("stockpot", 1.0),
            Noun("saute pan", 0.9),
            Noun("wok", 0.7, ("carbon steel", "nonstick", "cast iron")),
            Noun("cookware set", 2.5),
            Noun("grill pan", 0.7),
        ),
        tones=("black", "graphite", "red", "cream", "blue", "copper"),
        materials=("cast iron", "nonstick", "stainless steel", "carbon steel", "hard-anodized"),
        variants=("10-Inch", "12-Inch", "5-Quart", "with Lid", "Induction-Ready"),
        adjectives=("heavy-duty", "versatile", "durable", "professional", "everyday"),
        features=(
            "even heat distribution",
            "a stay-cool handle",
            "a tight-fitting lid",
            "an oven-safe build",
            "a PFOA-free coating",
            "pour spouts",
        ),
        uses=(
            "Sears, simmers and bakes with ease.",
            "Works on gas, electric and induction hobs.",
            "Made for weeknight dinners and slow braises.",
        ),
        brands=(
            ("Ironhearth", "premium"),
            ("Copperlane", "premium"),
            ("Chef's Row", "mid"),
            ("Simmerly", "mid"),
            ("Panwise", "budget"),
        ),
    ),
    CategorySpec(
        name="power tools",
        share=0.7,
        price_range=(30.0, 450.0),
        nouns=(
            Noun("drill driver", 1.0),
            Noun("impact driver", 1.1),
            Noun("circular saw", 1.3),
            Noun("jigsaw", 1.0),
            Noun("angle grinder", 0.9),
            Noun("orbital sander", 0.8),
            Noun("reciprocating saw", 1.2),
            Noun("rotary hammer", 1.6),
        ),
        tones=("cordless", "brushless", "compact", "heavy-duty"),
        materials=("12V", "18V", "20V", "40V"),
        variants=("Kit", "Combo Kit", "Tool Only", "with Case"),
        adjectives=("powerful", "ergonomic", "rugged", "precise", "reliable"),
        features=(
            "a brushless motor",
            "an LED work light",
            "a variable-speed trigger",
            "a soft-grip handle",
            "an electric brake",
            "a lithium-ion battery",
        ),
        uses=(
            "Handles home repairs and DIY projects.",
            "Made for wood, metal and plastic.",
            "Built for job sites and weekend workshops.",
        ),
        brands=(
            ("Ironbolt", "premium"),
            ("Benchmark Pro", "premium"),
            ("Torqline", "mid"),
            ("Gritworks", "budget"),
            ("Handyman Co", "budget"),
        ),
    ),
    CategorySpec(
        name="skincare",
        share=1.0,
        price_range=(6.0, 95.0),
        nouns=(
            Noun("serum", 1.1),
            Noun("moisturizer", 1.0),
            Noun("cleanser", 0.7),
            Noun("face mask", 0.8),
            Noun("eye cream", 1.2),
            Noun("sunscreen", 0.8, ("mineral", "zinc oxide", "broad-spectrum")),
            Noun("toner", 0.7),
            Noun("night cream", 1.2),
        ),
        tones=("hydrating", "brightening", "soothing", "firming", "fragrance-free", "oil-free"),
        materials=("hyaluronic acid", "vitamin C", "niacinamide", "retinol", "ceramide", "green tea", "aloe"),
        variants=("30 ml", "50 ml", "Travel Size", "Value Pack"),
        adjectives=("lightweight", "gentle", "rich", "non-greasy", "dermatologist-tested"),
        features=(
            "a fast-absorbing texture",
            "a pH-balanced formula",
            "antioxidants",
            "no added fragrance",
            "SPF 30 protection",
            "plant-based extracts",
        ),
        uses=(
            "Leaves skin soft, smooth and hydrated.",
            "Suits sensitive and combination skin types.",
            "Use morning and night for a healthy glow.",
        ),
        brands=(
            ("Lumière Lab", "premium"),
            ("Ceraluxe", "premium"),
            ("Dewpoint", "mid"),
            ("Skinsmith", "mid"),
            ("Purely Botanic", "budget"),
        ),
    ),
    CategorySpec(
        name="yoga & fitness",
        share=0.7,
        price_range=(8.0, 160.0),
        nouns=(
            Noun("yoga mat", 0.8, ("natural rubber", "cork", "TPE", "eco foam")),
            Noun("resistance band set", 0.5, ("latex-free", "fabric", "natural latex")),
            Noun("foam roller", 0.6, ("high-density", "textured EVA", "vibrating")),
            Noun("dumbbell set", 1.8, ("cast iron", "neoprene-coated", "hex rubber")),
            Noun("kettlebell", 1.1, ("cast iron", "vinyl-coated", "competition steel")),
            Noun("yoga block", 0.3, ("cork", "eco foam", "bamboo")),
            Noun("jump rope", 0.3, ("steel cable", "weighted", "PVC")),
            Noun("workout leggings", 1.0, ("sculpting knit", "sweat-wicking nylon", "recycled spandex")),
        ),
        tones=("black", "sage", "lavender", "charcoal", "teal", "coral"),
        materials=("natural rubber",),
        variants=("Pro", "Travel", "Extra Thick", "Home Gym", "Studio"),
        adjectives=("non-slip", "durable", "portable", "cushioned", "eco-friendly"),
        features=(
            "a textured grip",
            "a carrying strap",
            "extra cushioning",
            "alignment markings",
            "a sweat-resistant finish",
            "a compact design",
        ),
        uses=(
            "Great for yoga, pilates and home workouts.",
            "Builds strength and mobility at home.",
            "Packs light for the gym or studio.",
        ),
        brands=(
            ("Asana Studio", "premium"),
            ("Zenfold", "mid"),
            ("Flexora", "mid"),
            ("IronTide", "mid"),
            ("Corepath", "budget"),
        ),
    ),
    CategorySpec(
        name="toys",
        share=0.9,
        price_range=(7.0, 130.0),
        nouns=(
            Noun("building block set", 1.2, ("wooden", "magnetic", "interlocking")),
            Noun("teddy bear", 0.6, ("plush", "organic cotton", "faux fur")),
            Noun("train set", 1.3, ("wooden", "battery-powered", "die-cast")),
            Noun("jigsaw puzzle", 0.5, ("cardboard", "wooden", "glow-in-the-dark")),
            Noun("remote control car", 1.4, ("off-road", "rechargeable", "high-speed")),
            Noun("dollhouse", 2.0, ("wooden", "three-storey", "fold-out")),
            Noun("science kit", 1.0, ("STEM", "chemistry", "crystal-growing")),
            Noun("stacking rings", 0.4, ("wooden", "silicone", "soft fabric")),
        ),
        tones=("rainbow", "pastel", "red", "blue", "natural", "bright"),
        materials=("wooden",),
        variants=("100-Piece", "Deluxe", "Starter", "Classic", "Mini"),
        adjectives=("educational", "colourful", "durable", "playful", "kid-safe"),
        features=(
            "rounded safe edges",
            "non-toxic paints",
            "easy storage",
            "bright colours",
            "a sturdy build",
            "clear instructions",
        ),
        uses=(
            "Sparks creativity and hours of imaginative play.",
            "An ideal gift for kids aged 3 and up.",
            "Builds fine motor and problem-solving skills.",
        ),
        brands=(
            ("Kindlewood", "premium"),
            ("Playnest", "mid"),
            ("Brightbloc", "mid"),
            ("Tumbletot", "budget"),
            ("Little Orbit", "budget"),
        ),
    ),
    CategorySpec(
        name="watches",
        share=0.7,
        price_range=(40.0, 950.0),
        nouns=(
            Noun("chronograph", 1.4),
            Noun("dive watch", 1.3),
            Noun("dress watch", 1.1),
            Noun("field watch", 0.8),
            Noun("smartwatch", 1.0, ("aluminium", "silicone strap", "titanium")),
            Noun("automatic watch", 1.6),
            Noun("minimalist watch", 0.7),
        ),
        tones=("black", "silver", "gold", "rose-gold", "blue", "green"),
        materials=("stainless steel", "leather strap", "titanium", "mesh bracelet", "ceramic", "nylon strap"),
        variants=("38mm", "40mm", "42mm", "Sapphire", "Limited Edition"),
        adjectives=("classic", "rugged", "elegant", "water-resistant", "refined"),
        features=(
            "a sapphire crystal",
            "luminous hands",
            "a date window",
            "100 m water resistance",
            "a quick-release strap",
            "a Japanese quartz movement",
        ),
        uses=(
            "A timeless piece for everyday wear.",
            "Handles the office, the gym and the beach.",
            "Makes a thoughtful gift for any occasion.",
        ),
        brands=(
            ("Horloge Marin", "premium"),
            ("Kronwell", "premium"),
            ("Tempo & Tide", "mid"),
            ("Meridian Watch Co", "mid"),
            ("Ticksmith", "budget"),
        ),
    ),
    CategorySpec(
        name="bedding",
        share=0.8,
        price_range=(18.0, 320.0),
        nouns=(
            Noun("duvet cover", 1.0),
            Noun("sheet set", 0.9),
            Noun("quilt", 1.2),
            Noun("comforter", 1.3),
            Noun("pillowcase pair", 0.4),
            Noun("weighted blanket", 1.4, ("cotton", "bamboo", "minky")),
            Noun("throw blanket", 0.6, ("chunky knit", "sherpa", "waffle cotton")),
        ),
        tones=("white", "ivory", "sage", "grey", "navy", "blush", "oat"),
        materials=("cotton percale", "cotton sateen", "linen", "bamboo", "brushed microfiber", "flannel"),
        variants=("Twin", "Queen", "King", "Full/Queen", "Oversized"),
        adjectives=("breathable", "soft", "cozy", "crisp", "hotel-quality"),
        features=(
            "a 300 thread count",
            "corner ties",
            "deep pockets",
            "a hidden button closure",
            "a stonewashed finish",
            "temperature regulation",
        ),
        uses=(
            "Sleeps cool through warm summer nights.",
            "Brings hotel comfort to your bedroom.",
            "Gets softer with every wash.",
        ),
        brands=(
            ("Linen & Loft", "premium"),
            ("Hushnest", "mid"),
            ("Dovedale Home", "mid"),
            ("Slumberly", "budget"),
            ("Cottonfield", "budget"),
        ),
    ),
)
"""The categories, in a fixed order (the position is the category code)."""

MULTI_CATEGORY_BRANDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Northvale", "mid", ("jackets", "sneakers", "running shoes", "yoga & fitness")),
    ("Hearth & Co", "mid", ("cookware", "coffee makers", "bedding")),
    ("Atelier Noor", "premium", ("handbags", "dresses", "watches")),
    ("Basics Lane", "budget", ("jeans", "dresses", "sneakers", "bedding")),
    ("Orbital Labs", "premium", ("headphones", "watches")),
)
"""Brands that sell in several categories, so brand affinity carries across categories."""

COLOURS: tuple[str, ...] = (
    "black", "white", "grey", "navy", "blue", "red", "green", "olive", "sage",
    "cream", "ivory", "tan", "brown", "silver", "gold", "blush", "charcoal",
)  # fmt: skip
"""Tones a user can prefer; matching items get a boost in every category that uses them."""

REGIONS: tuple[str, ...] = ("north", "south", "east", "west", "central")
REGION_SHARE: tuple[float, ...] = (0.22, 0.24, 0.2, 0.22, 0.12)

AGE_BANDS: tuple[str, ...] = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
AGE_BAND_SHARE: tuple[float, ...] = (0.16, 0.28, 0.22, 0.16, 0.11, 0.07)

AGE_BAND_CATEGORY_LIFT: dict[str, dict[str, float]] = {
    "18-24": {"sneakers": 1.6, "headphones": 1.5, "skincare": 1.3, "dresses": 1.2, "toys": 0.4,
              "power tools": 0.5, "bedding": 0.6, "coffee makers": 0.7},
    "25-34": {"running shoes": 1.3, "yoga & fitness": 1.3, "coffee makers": 1.2, "toys": 1.2},
    "35-44": {"toys": 1.6, "cookware": 1.3, "bedding": 1.2, "power tools": 1.2},
    "45-54": {"cookware": 1.3, "power tools": 1.4, "watches": 1.3, "bedding": 1.2, "sneakers": 0.7},
    "55-64": {"bedding": 1.3, "cookware": 1.3, "watches": 1.2, "headphones": 0.7, "sneakers": 0.6},
    "65+": {"bedding": 1.4, "toys": 1.3, "cookware": 1.2, "headphones": 0.6, "running shoes": 0.6},
}  # fmt: skip
"""Mild, observable correlation between a profile column and tastes (helps cold start)."""

DEVICE_SHARE: tuple[float, ...] = (0.45, 0.32, 0.23)  # web, ios, android
"""Share of users whose main device is each of :data:`shared.data.DEVICES`."""

HOURLY_TRAFFIC: tuple[float, ...] = (
    0.25, 0.15, 0.1, 0.08, 0.08, 0.12, 0.25, 0.45, 0.6, 0.65, 0.7, 0.75,
    0.85, 0.8, 0.7, 0.7, 0.75, 0.85, 1.0, 1.2, 1.35, 1.3, 1.0, 0.55,
)  # fmt: skip
"""Relative session starts per hour of day: quiet nights, a lunch bump, an evening peak."""

# Behaviour knobs. Chosen so that at defaults the mix is ~80% views, ~13% carts, ~6% purchases.
_FAVOURITE_CATEGORY_MASS = 0.85  # share of browsing in the favourite categories
_SESSION_FOCUS = 0.85  # share of a session's views in its main category
_REVISIT_RATE = 0.08  # share of views that re-open an item from an earlier session
_CART_PER_VIEW = 0.1625
_PURCHASE_PER_CART = 0.5
_DIRECT_PURCHASE_PER_VIEW = 0.008  # "buy now" without a cart event
_REPEAT_PURCHASE_KEEP = 0.1  # chance a repeat purchase of the same item survives
_EVENTS_PER_VIEW = 1.242  # calibrated: events / views after the funnel
_OUT_OF_STOCK_RATE = 0.08
_NEW_ITEM_RATE = 0.12
_MAIN_DEVICE_RATE = 0.85
_MAX_VIEWS_PER_SESSION = 12
_MAX_GAP_SECONDS = 420
_SESSION_TAIL_SECONDS = 3 * HOUR  # a session (views, carts, checkout) always fits in this


# --------------------------------------------------------------------------------------
# Latent tables (kept in memory only; never written to the dataset).
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Brands:
    names: tuple[str, ...]
    tier: IntArray  # (B,)
    in_category: BoolArray  # (B, C)


@dataclass(frozen=True)
class _ItemLatents:
    category: IntArray
    brand: IntArray
    tier: IntArray
    tone: IntArray  # index into COLOURS, -1 when the tone is not a colour
    rel_price: FloatArray  # log price minus the category's median log price
    popularity: FloatArray
    freshness: FloatArray
    in_stock: BoolArray
    created_at: IntArray


@dataclass(frozen=True)
class _UserTastes:
    category_pref: FloatArray  # (U, C), rows sum to 1
    favourite_brands: BoolArray  # (U, B)
    tier: IntArray
    price_level: FloatArray  # preferred rel_price
    price_tolerance: FloatArray  # smaller: more price sensitive
    colour: IntArray  # index into COLOURS, -1 for no preference
    activity: FloatArray
    device: IntArray
    created_at: IntArray


def _brand_table() -> _Brands:
    """All brands in a fixed order: each category's own, then the multi-category ones."""
    names: list[str] = []
    tiers: list[int] = []
    rows: list[list[bool]] = []
    category_names = [spec.name for spec in CATEGORIES]
    for c, spec in enumerate(CATEGORIES):
        for name, tier in spec.brands:
            names.append(name)
            tiers.append(TIERS.index(tier))
            rows.append([other == c for other in range(len(CATEGORIES))])
    for name, tier, categories in MULTI_CATEGORY_BRANDS:
        unknown = [category for category in categories if category not in category_names]
        if unknown:  # a typo here would silently shrink the brand's reach
            raise ValueError(f"brand {name!r} lists unknown categories {unknown}")
        names.append(name)
        tiers.append(TIERS.index(tier))
        rows.append([category in categories for category in category_names])
    return _Brands(
        names=tuple(names),
        tier=np.asarray(tiers, dtype=np.int64),
        in_category=np.asarray(rows, dtype=np.bool_),
    )


def _categorical_rows(rng: np.random.Generator, probs: FloatArray, rows: IntArray) -> IntArray:
    """One draw per entry of ``rows`` from the categorical distribution ``probs[row]``."""
    cumulative = np.cumsum(probs[rows], axis=1)
    cumulative /= cumulative[:, -1:]
    u = rng.random(len(rows))[:, None]
    drawn: IntArray = np.minimum((cumulative <= u).sum(axis=1), probs.shape[1] - 1).astype(np.int64)
    return drawn


def _gumbel_top(rng: np.random.Generator, log_weights: FloatArray, k: int) -> IntArray:
    """Per row, ``k`` distinct columns sampled without replacement proportionally to weights."""
    gumbel = -np.log(-np.log(rng.random(log_weights.shape) * (1 - 1e-12) + 1e-12))
    return np.argsort(-(log_weights + gumbel), axis=1, kind="stable")[:, :k].astype(np.int64)


def _allocate(total: int, weights: FloatArray) -> IntArray:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder)."""
    exact = total * weights / weights.sum()
    counts: IntArray = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:remainder]] += 1
    return counts


def _title_case(phrase: str) -> str:
    """Capitalise each word and hyphen part but keep the rest ("12V", "pH", "TPE") as written."""
    return " ".join("-".join(part[:1].upper() + part[1:] for part in word.split("-")) for word in phrase.split())


def _is_plural(noun: str) -> bool:
    """Plural product nouns ("jeans", "earbuds", "stacking rings") take no article."""
    return noun.endswith("s") and not noun.endswith("ss")


def _article(word: str) -> str:
    return "An" if word[:1].lower() in "aeiou" else "A"


# --------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------


def _generate_catalog(
    rng: np.random.Generator, config: GeneratorConfig, brands: _Brands
) -> tuple[Catalog, _ItemLatents, FloatArray]:
    """Items with texts, prices, stock and creation times, plus their latent attributes.

    Also returns each brand's popularity, which user brand preferences lean on.
    """
    n = config.n_items
    n_categories = len(CATEGORIES)
    shares = np.asarray([spec.share for spec in CATEGORIES], dtype=np.float64)
    category = rng.permutation(np.repeat(np.arange(n_categories), _allocate(n, shares))).astype(np.int64)

    brand_popularity = np.exp(rng.normal(0.0, 0.5, len(brands.names)))
    brand_size = np.exp(rng.normal(0.0, 0.4, len(brands.names)))
    brand = np.zeros(n, dtype=np.int64)
    noun = np.zeros(n, dtype=np.int64)
    tone = np.zeros(n, dtype=np.int64)
    variant = np.zeros(n, dtype=np.int64)
    adjective = np.zeros(n, dtype=np.int64)
    use = np.zeros(n, dtype=np.int64)
    features = np.zeros((n, 2), dtype=np.int64)
    for c, spec in enumerate(CATEGORIES):
        rows = np.flatnonzero(category == c)
        candidates = np.flatnonzero(brands.in_category[:, c])
        weights = brand_size[candidates] / brand_size[candidates].sum()
        brand[rows] = rng.choice(candidates, size=len(rows), p=weights)
        noun[rows] = rng.integers(0, len(spec.nouns), len(rows))
        tone[rows] = rng.integers(0, len(spec.tones), len(rows))
        variant[rows] = rng.integers(0, len(spec.variants), len(rows))
        adjective[rows] = rng.integers(0, len(spec.adjectives), len(rows))
        use[rows] = rng.integers(0, len(spec.uses), len(rows))
        features[rows] = _gumbel_top(rng, np.zeros((len(rows), len(spec.features))), 2)
    material_u = rng.random(n)
    keep_variant = rng.random(n) < 0.75

    colour_index = {colour: i for i, colour in enumerate(COLOURS)}
    titles: list[str] = []
    descriptions: list[str] = []
    item_tone = np.full(n, -1, dtype=np.int64)
    noun_price = np.ones(n, dtype=np.float64)
    for i in range(n):
        spec = CATEGORIES[int(category[i])]
        noun_spec = spec.nouns[int(noun[i])]
        materials = noun_spec.materials or spec.materials
        material = materials[min(int(material_u[i] * len(materials)), len(materials) - 1)]
        tone_word = spec.tones[int(tone[i])]
        item_tone[i] = colour_index.get(tone_word, -1)
        noun_price[i] = noun_spec.price_factor
        words = [
            brands.names[int(brand[i])],
            _title_case(tone_word),
            _title_case(material),
            _title_case(noun_spec.name),
        ]
        title = " ".join(words)
        with_variant = f"{title} {spec.variants[int(variant[i])]}"
        titles.append(with_variant if keep_variant[i] and len(with_variant.split()) <= 9 else title)

        adjective_word = spec.adjectives[int(adjective[i])]
        first, second = (spec.features[int(f)] for f in features[i])
        if _is_plural(noun_spec.name):  # "Durable rigid denim slim jeans with ..."
            head = f"{adjective_word[:1].upper()}{adjective_word[1:]} {material} {noun_spec.name}"
        else:
            head = f"{_article(adjective_word)} {adjective_word} {material} {noun_spec.name}"
        description = f"{head} with {first} and {second}. {spec.uses[int(use[i])]}"
        if len(description.split()) > 25:
            description = f"{head} with {first}. {spec.uses[int(use[i])]}"
        descriptions.append(description)

    brand_tier = brands.tier[brand]
    low = np.asarray([spec.price_range[0] for spec in CATEGORIES])[category]
    high = np.asarray([spec.price_range[1] for spec in CATEGORIES])[category]
    tier_factor = np.asarray(TIER_PRICE_FACTOR)[brand_tier]
    raw = np.sqrt(low * high) * noun_price * tier_factor * np.exp(rng.normal(0.0, 0.35, n))
    raw = np.clip(raw, 0.5 * low, 1.5 * high)
    prices = np.maximum(np.round(raw) - 0.01, 0.99)

    log_price = np.log(prices)
    rel_price = np.empty(n, dtype=np.float64)
    for c in range(n_categories):
        rows = category == c
        rel_price[rows] = log_price[rows] - np.median(log_price[rows])

    in_stock = rng.random(n) >= _OUT_OF_STOCK_RATE
    stock = np.where(in_stock, rng.geometric(1 / 40, n), 0).astype(np.int64)

    window = config.days * DAY
    is_new = rng.random(n) < _NEW_ITEM_RATE
    old_created = config.start - rng.integers(1, 365 * DAY, n)
    new_created = config.start + rng.integers(0, max(1, int(0.85 * window)), n)
    created_at = np.where(is_new, new_created, old_created).astype(np.int64)
    age_days = np.maximum(config.start - created_at, 0) / DAY
    freshness = 1.0 + 1.2 * np.exp(-age_days / 30.0)

    popularity = np.exp(rng.normal(0.0, 1.1, n)) * brand_popularity[brand]

    catalog = Catalog(
        item_ids=np.asarray([f"SKU-{i + 1:06d}" for i in range(n)], dtype=np.str_),
        titles=np.asarray(titles, dtype=np.str_),
        descriptions=np.asarray(descriptions, dtype=np.str_),
        brands=np.asarray(brands.names, dtype=np.str_)[brand],
        categories=np.asarray([spec.name for spec in CATEGORIES], dtype=np.str_)[category],
        prices=prices.astype(np.float64),
        stock=stock,
        created_at=created_at,
    )
    latents = _ItemLatents(
        category=category,
        brand=brand,
        tier=brand_tier.astype(np.int64),
        tone=item_tone,
        rel_price=rel_price,
        popularity=popularity,
        freshness=freshness,
        in_stock=in_stock,
        created_at=created_at,
    )
    return catalog, latents, brand_popularity


# --------------------------------------------------------------------------------------
# Users
# --------------------------------------------------------------------------------------


def _generate_users(
    rng: np.random.Generator, config: GeneratorConfig, brands: _Brands, brand_popularity: FloatArray
) -> tuple[Users, _UserTastes]:
    """The user table and each user's hidden tastes."""
    n = config.n_users
    n_categories = len(CATEGORIES)
    age_band = rng.choice(len(AGE_BANDS), size=n, p=np.asarray(AGE_BAND_SHARE) / sum(AGE_BAND_SHARE))
    region = rng.choice(len(REGIONS), size=n, p=np.asarray(REGION_SHARE) / sum(REGION_SHARE))

    lift = np.asarray(
        [[AGE_BAND_CATEGORY_LIFT.get(band, {}).get(spec.name, 1.0) for spec in CATEGORIES] for band in AGE_BANDS]
    )
    shares = np.asarray([spec.share for spec in CATEGORIES], dtype=np.float64)
    prior = shares[None, :] * lift[age_band]
    prior /= prior.sum(axis=1, keepdims=True)

    # 1-3 favourite categories drawn from the (age-dependent) prior, Dirichlet-like weights.
    n_favourite = rng.choice(np.asarray([1, 2, 3]), size=n, p=[0.35, 0.45, 0.2])
    top = _gumbel_top(rng, np.log(prior), 3)
    raw = rng.gamma(2.0, 1.0, (n, 3)) * (np.arange(3)[None, :] < n_favourite[:, None])
    favourite_weights = np.zeros((n, n_categories))
    np.put_along_axis(favourite_weights, top, raw, axis=1)
    favourite_weights /= favourite_weights.sum(axis=1, keepdims=True)
    category_pref = _FAVOURITE_CATEGORY_MASS * favourite_weights + (1 - _FAVOURITE_CATEGORY_MASS) * prior
    favourite_categories = favourite_weights > 0

    tier = rng.choice(len(TIERS), size=n, p=[0.3, 0.5, 0.2]).astype(np.int64)
    price_level = (tier - 1) * 0.45 + rng.normal(0.0, 0.2, n)
    price_tolerance = rng.uniform(0.3, 0.8, n)

    # 1-3 favourite brands among those selling in the favourite categories, leaning on tier.
    eligible = (favourite_categories.astype(np.float64) @ brands.in_category.T.astype(np.float64)) > 0
    affinity = np.asarray(TIER_AFFINITY)[tier[:, None], brands.tier[None, :]] * brand_popularity[None, :]
    log_weights = np.where(eligible, np.log(affinity), -np.inf)
    top_brands = _gumbel_top(rng, log_weights, 3)
    n_brands = rng.choice(np.asarray([1, 2, 3]), size=n, p=[0.3, 0.45, 0.25])
    chosen = np.zeros_like(eligible)
    keep = np.arange(3)[None, :] < n_brands[:, None]
    np.put_along_axis(chosen, top_brands, keep, axis=1)
    favourite_brands = chosen & eligible

    colour = np.where(rng.random(n) < 0.6, rng.integers(0, len(COLOURS), n), -1).astype(np.int64)
    # Heavy-tailed, capped so the most active user stays human (a few sessions a day).
    activity = np.exp(np.minimum(rng.normal(0.0, 1.1, n), 3.0))
    device = rng.choice(len(DEVICES), size=n, p=np.asarray(DEVICE_SHARE) / sum(DEVICE_SHARE)).astype(np.int64)

    window = config.days * DAY
    joined_during = rng.random(n) < 0.22
    created_at = np.where(
        joined_during,
        config.start + rng.integers(0, max(1, int(0.8 * window)), n),
        config.start - rng.integers(1, 730 * DAY, n),
    ).astype(np.int64)

    users = Users(
        user_ids=np.asarray([f"U-{i + 1:05d}" for i in range(n)], dtype=np.str_),
        created_at=created_at,
        profile={
            "region": np.asarray(REGIONS, dtype=np.str_)[region],
            "age_band": np.asarray(AGE_BANDS, dtype=np.str_)[age_band],
        },
    )
    tastes = _UserTastes(
        category_pref=category_pref,
        favourite_brands=favourite_brands,
        tier=tier,
        price_level=price_level,
        price_tolerance=price_tolerance,
        colour=colour,
        activity=activity,
        device=device,
        created_at=created_at,
    )
    return users, tastes


# --------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Affinity:
    """How well items suit users, broadcast over whatever shapes the indices have."""

    favourite_brand: BoolArray
    tier: FloatArray
    price_fit: FloatArray
    colour_match: BoolArray


def _affinity(tastes: _UserTastes, items: _ItemLatents, user: IntArray, item: IntArray) -> _Affinity:
    deviation = (items.rel_price[item] - tastes.price_level[user]) / tastes.price_tolerance[user]
    return _Affinity(
        favourite_brand=tastes.favourite_brands[user, items.brand[item]],
        tier=np.asarray(TIER_AFFINITY)[tastes.tier[user], items.tier[item]],
        price_fit=np.exp(-0.5 * deviation**2),
        colour_match=(tastes.colour[user] == items.tone[item]) & (items.tone[item] >= 0),
    )


def _browse_weight(a: _Affinity, items: _ItemLatents, item: IntArray) -> FloatArray:
    """Chance weight that a user opens an item while browsing its category."""
    weight: FloatArray = (
        items.popularity[item]
        * items.freshness[item]
        * (1.0 + 3.0 * a.favourite_brand)
        * a.tier
        * (0.05 + a.price_fit)
        * (1.0 + 0.6 * a.colour_match)
    )
    return weight


def _plan_sessions(
    rng: np.random.Generator, config: GeneratorConfig, tastes: _UserTastes
) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """Sessions as (user, start time, device, number of views), in no particular order."""
    target_views = max(1, round(config.n_events / _EVENTS_PER_VIEW))
    lengths = 1 + np.minimum(rng.negative_binomial(1.5, 0.3, target_views), _MAX_VIEWS_PER_SESSION - 1)
    total = np.cumsum(lengths)
    n_sessions = int(np.searchsorted(total, target_views)) + 1
    lengths = lengths[:n_sessions].astype(np.int64)
    lengths[-1] -= int(total[n_sessions - 1]) - target_views  # land exactly on target_views

    window_end = config.start + config.days * DAY
    latest_start = window_end - _SESSION_TAIL_SECONDS
    earliest = np.maximum(tastes.created_at, config.start)
    active_share = (latest_start - earliest) / (latest_start - config.start)
    weights = tastes.activity * np.clip(active_share, 0.01, 1.0)
    n_users = len(weights)
    base = 1 if n_sessions >= n_users else 0
    extra = rng.multinomial(n_sessions - base * n_users, weights / weights.sum())
    user = np.repeat(np.arange(n_users), base + extra).astype(np.int64)

    # Start times: uniform over the user's active span, thinned by the hourly rhythm.
    rhythm = np.asarray(HOURLY_TRAFFIC) / max(HOURLY_TRAFFIC)
    start = np.zeros(n_sessions, dtype=np.int64)
    pending = np.arange(n_sessions)
    while len(pending):
        low = earliest[user[pending]]
        candidate = low + (rng.random(len(pending)) * (latest_start - low)).astype(np.int64)
        accept = rng.random(len(pending)) < rhythm[(candidate // HOUR) % 24]
        start[pending[accept]] = candidate[accept]
        pending = pending[~accept]

    on_main = rng.random(n_sessions) < _MAIN_DEVICE_RATE
    other = (tastes.device[user] + rng.integers(1, len(DEVICES), n_sessions)) % len(DEVICES)
    device = np.where(on_main, tastes.device[user], other).astype(np.int64)
    return user, start, device, lengths


def _sample_items(
    rng: np.random.Generator,
    tastes: _UserTastes,
    items: _ItemLatents,
    user: IntArray,
    category: IntArray,
    timestamp: IntArray,
) -> tuple[IntArray, BoolArray]:
    """For each view, an item of its category drawn by browse weight among items already on sale.

    Per category, the weights of every (user in that category, item) pair form a matrix whose
    rows are turned into CDFs and laid end to end (row r spans (r, r+1]), so all views are drawn
    with a single searchsorted. Returns the items and which views found an available item.
    """
    chosen = np.zeros(len(user), dtype=np.int64)
    found = np.zeros(len(user), dtype=np.bool_)
    for c in range(len(CATEGORIES)):
        views = np.flatnonzero(category == c)
        candidates = np.flatnonzero(items.category == c)
        if len(views) == 0 or len(candidates) == 0:
            continue
        users_c, row = np.unique(user[views], return_inverse=True)
        affinity = _affinity(tastes, items, users_c[:, None], candidates[None, :])
        cdf = np.cumsum(_browse_weight(affinity, items, candidates[None, :]), axis=1)
        cdf /= cdf[:, -1:]
        cdf[:, -1] = 1.0
        flat = (cdf + np.arange(len(users_c))[:, None]).ravel()
        pending = np.arange(len(views))
        for _ in range(12):  # redraw views that hit an item not yet on sale
            position = np.searchsorted(flat, row[pending] + rng.random(len(pending)), side="right")
            column = np.minimum(position - row[pending] * len(candidates), len(candidates) - 1)
            picked = candidates[column]
            ok = items.created_at[picked] <= timestamp[views[pending]]
            chosen[views[pending[ok]]] = picked[ok]
            found[views[pending[ok]]] = True
            pending = pending[~ok]
            if len(pending) == 0:
                break
    return chosen, found


def _run_boundaries(keys: IntArray) -> IntArray:
    """For each position of a grouped array, the index where its run of equal keys starts."""
    starts = np.ones(len(keys), dtype=np.bool_)
    starts[1:] = keys[1:] != keys[:-1]
    return np.maximum.accumulate(np.where(starts, np.arange(len(keys)), 0)).astype(np.int64)


def _generate_events(
    rng: np.random.Generator,
    config: GeneratorConfig,
    tastes: _UserTastes,
    items: _ItemLatents,
) -> Events:
    """Sessions of views, then carts and purchases from the funnel, sorted by time."""
    n_items = len(items.category)
    session_user, session_start, session_device, lengths = _plan_sessions(rng, config, tastes)
    n_sessions = len(session_user)

    # Views: contiguous per session, seconds to minutes apart.
    session = np.repeat(np.arange(n_sessions), lengths).astype(np.int64)
    first_of_session = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    gaps = np.clip(np.exp(rng.normal(np.log(45.0), 0.8, len(session))), 4, _MAX_GAP_SECONDS).astype(np.int64)
    gaps[first_of_session] = 0
    elapsed = np.cumsum(gaps)
    offset = elapsed - elapsed[first_of_session][session]
    user = session_user[session]
    timestamp = session_start[session] + offset

    # Each session has a main category from the user's tastes; a few views stray.
    session_category = _categorical_rows(rng, tastes.category_pref, session_user)
    stray = rng.random(len(session)) >= _SESSION_FOCUS
    category = np.where(stray, _categorical_rows(rng, tastes.category_pref, user), session_category[session]).astype(
        np.int64
    )

    item, found = _sample_items(rng, tastes, items, user, category, timestamp)
    session, user, timestamp, item = session[found], user[found], timestamp[found], item[found]

    # Order views by user then time, so "earlier sessions of this user" is a contiguous range.
    order = np.lexsort((np.arange(len(session)), session, session_start[session], user))
    session, user, timestamp, item = session[order], user[order], timestamp[order], item[order]

    # Re-views: some views re-open an item seen in one of the user's recent earlier sessions.
    user_first = _run_boundaries(user)
    session_first = _run_boundaries(session)
    revisit = (rng.random(len(item)) < _REVISIT_RATE) & (session_first > user_first)
    back = rng.geometric(0.35, len(item))
    source = np.maximum(session_first - back, user_first)
    targets = np.flatnonzero(revisit)
    for _ in range(len(item)):  # resolve chains of re-views (k < p always, so this ends)
        updated = item[source[targets]]
        if np.array_equal(updated, item[targets]):
            break
        item[targets] = updated

    # Funnel: carts and purchases follow affinity; out-of-stock items are only viewed.
    affinity = _affinity(tastes, items, user, item)
    cart_weight = (
        items.in_stock[item]
        * (1.0 + 1.5 * affinity.favourite_brand)
        * affinity.tier
        * (0.25 + affinity.price_fit)
        * (1.0 + 0.8 * revisit)
    )
    cart_p = np.minimum(_CART_PER_VIEW * cart_weight / max(cart_weight.mean(), 1e-12), 0.9)
    carted = rng.random(len(item)) < cart_p

    buy_weight = (0.3 + affinity.price_fit) * (1.0 + 0.5 * affinity.favourite_brand)
    buy_mean = buy_weight[carted].mean() if carted.any() else 1.0
    buy_p = np.minimum(_PURCHASE_PER_CART * buy_weight / buy_mean, 0.95)
    direct = ~carted & items.in_stock[item] & (rng.random(len(item)) < _DIRECT_PURCHASE_PER_VIEW)
    bought = (carted & (rng.random(len(item)) < buy_p)) | direct

    # One purchase per item per session; repeat purchases across sessions are rare.
    bought_rows = np.flatnonzero(bought)
    _, first_in_session = np.unique(session[bought_rows] * n_items + item[bought_rows], return_index=True)
    bought_rows = np.sort(bought_rows[first_in_session])
    _, first_for_user = np.unique(user[bought_rows] * n_items + item[bought_rows], return_index=True)
    is_first = np.zeros(len(bought_rows), dtype=np.bool_)
    is_first[first_for_user] = True
    keep_repeat = rng.random(len(bought_rows)) < _REPEAT_PURCHASE_KEEP
    bought_rows = bought_rows[is_first | keep_repeat]

    # Cart right after its view; checkout after the session's last view (and every cart).
    cart_rows = np.flatnonzero(carted)
    cart_time = timestamp[cart_rows] + rng.integers(5, 91, len(cart_rows))
    last_view = np.full(n_sessions, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(last_view, session, timestamp)
    checkout = last_view + 100 + rng.integers(20, 241, n_sessions)
    purchase_time = checkout[session[bought_rows]] + rng.integers(0, 4, len(bought_rows))

    rows = np.concatenate((np.arange(len(item)), cart_rows, bought_rows))
    codes = np.concatenate(
        (
            np.full(len(item), VIEW_CODE, dtype=np.int8),
            np.full(len(cart_rows), CART_CODE, dtype=np.int8),
            np.full(len(bought_rows), PURCHASE_CODE, dtype=np.int8),
        )
    )
    times = np.concatenate((timestamp, cart_time, purchase_time)).astype(np.int64)
    order = np.lexsort((np.arange(len(rows)), codes, times))
    rows, codes, times = rows[order], codes[order], times[order]

    # Session ids numbered in order of start, over the sessions that kept at least one view.
    used = np.zeros(n_sessions, dtype=np.bool_)
    used[session] = True
    used_sessions = np.flatnonzero(used)
    ranked = used_sessions[np.lexsort((used_sessions, session_start[used_sessions]))]
    label_width = max(7, len(str(len(ranked))))
    labels = np.full(n_sessions, "", dtype=f"<U{label_width + 2}")
    labels[ranked] = [f"S-{k + 1:0{label_width}d}" for k in range(len(ranked))]

    event_session = session[rows]
    user_index: Int32Array = user[rows].astype(np.int32)
    item_index: Int32Array = item[rows].astype(np.int32)
    device: StrArray = np.asarray(DEVICES, dtype=np.str_)[session_device[event_session]]
    session_id: StrArray = labels[event_session].astype(np.str_)
    return Events(
        user_index=user_index,
        item_index=item_index,
        event_code=codes,
        timestamp=times,
        device=device,
        session_id=session_id,
    )


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def generate(config: GeneratorConfig) -> Dataset:
    """Generate the synthetic retail dataset described by ``config``.

    Deterministic: every random draw comes from one ``default_rng(config.seed)`` in a fixed
    order, so equal configs give equal arrays.
    """
    config.validate()
    rng = np.random.default_rng(config.seed)
    brands = _brand_table()
    catalog, item_latents, brand_popularity = _generate_catalog(rng, config, brands)
    users, tastes = _generate_users(rng, config, brands, brand_popularity)
    events = _generate_events(rng, config, tastes, item_latents)
    source: dict[str, Any] = {"generator": "vitrine.datagen", "seed": config.seed, "config": asdict(config)}
    return Dataset(name="vitrine-synthetic", catalog=catalog, users=users, events=events, source=source)


def write_default_dataset(out_dir: Path, config: GeneratorConfig) -> Dataset:
    """Generate a dataset and save it to ``out_dir`` in the format of :func:`shared.data.save_dataset`."""
    dataset = generate(config)
    save_dataset(dataset, Path(out_dir))
    return dataset

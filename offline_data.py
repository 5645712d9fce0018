"""
The built-in data: a generator, owned by this project, of everything the pipeline needs when the
hub cannot be reached (and for the tests). Deterministic for a seed.

English: ~3.5 MB of templated stories, dialogues and explanations about a small world of children,
animals, places and things; chats about that same world (facts, sums, spelling, rewriting, stories,
questions about a story); reasoning problems (multi-step word sums, letter and item counting) with
worked <think> traces and a checkable "answer"; and preference pairs of such problems, the right worked
answer chosen over a wrong one (a slip in a sum, the wrong operation, a miscount, a number copied from the
question). Chinese: the same kinds of data as templated Chinese, with a smaller world.

  from offline_data import write_offline_data
  write_offline_data("data", lang="en", seed=0)   # the eight files download_mini_data.py writes offline
"""
import json
import os
import random
import re

from cli import UserError
from records import atomic_write
from tools import calculator, tool_spec


def think_reply(reasoning: str, reply: str) -> str:
    """An assistant reply with its reasoning: the one layout of <think> that every record uses. Without reasoning
    the block is empty, written as Qwen3 writes it (tokenizer.EMPTY_THINK, what enable_thinking=False prefills)."""
    if not reasoning.strip():
        return f"<think>\n\n</think>\n\n{reply.strip()}"
    return f"<think>\n{reasoning.strip()}\n</think>\n{reply.strip()}"


# ----------------------------------------------------------------------------------------------------------------
# English: a small world of characters, animals, places and things

GIRLS = ("Lily Mia Anna Zoe Emma Lucy Sara Ella Ruby Nora Maya Chloe Grace Ivy Rose Amy Kate Lena Hannah Molly "
         "Julia Clara Alice Daisy Eva Nina Olive Poppy Sophie Tara Bella Jenny Laura Megan Holly Fiona Hazel Iris "
         "Jade Kitty Leah Lola Mary Nell Paula Rita Susie Tess Wendy Yara").split()
BOYS = ("Tom Sam Ben Max Leo Jack Finn Noah Oscar Theo Luke Adam Ryan Owen Jake Eli Hugo Felix Oliver Henry "
        "Charlie Toby Milo Dan Peter Paul Nick Alex Mark Jon Arthur Billy Carl David Eddie Frank George Harry "
        "Ian Jamie Kevin Liam Mike Ned Ollie Ricky Simon Tim Victor Will").split()
PET_NAMES = ("Pip Spot Fluffy Coco Sunny Buddy Whiskers Bubbles Pepper Biscuit Ziggy Patch Muffin Rusty Snowy "
             "Tiny Bolt Pebble Honey Button Nutmeg Ginger Socks Clover Maple Noodle Waffle Sprout Dot Acorn").split()
HERO_ANIMALS = ("cat dog rabbit fox bear mouse bird frog duck owl pig lion puppy kitten squirrel turtle horse "
                "hedgehog goat deer badger otter beaver lamb penguin raccoon tiger elephant monkey chick").split()
TRAITS = ("little kind brave curious shy happy clever sleepy funny quiet busy gentle friendly cheerful careful "
          "proud silly young bold playful helpful polite lively smart patient noisy lazy tiny grumpy").split()
GOOD_FEELINGS = "happy glad proud excited joyful delighted thankful calm cheerful warm".split()
BAD_FEELINGS = "sad upset worried scared grumpy unhappy lonely nervous cross tired".split()
COLORS = "red blue green yellow purple orange pink white black brown gold silver gray".split()
LOOKS = "big small tiny shiny old new soft round little bright striped spotted heavy light fluffy".split()
THINGS = ["ball", "kite", "box", "key", "hat", "book", "boat", "shell", "stone", "map", "lamp", "drum", "bell",
          "cup", "sock", "robot", "doll", "balloon", "blanket", "scarf", "coin", "ring", "feather", "crayon",
          "puzzle", "bike", "umbrella", "basket", "spoon", "pencil", "jar", "ribbon", "whistle", "marble",
          "teddy bear", "toy car", "toy train", "bucket", "wagon", "flute", "backpack", "mitten", "necklace",
          "paintbrush", "music box", "yo-yo", "glove", "bowl", "clock", "comb", "notebook", "pillow", "shovel",
          "skateboard", "sled", "star sticker", "toothbrush", "trumpet", "watch", "wand", "helmet", "bracelet",
          "rocket", "puppet", "rope", "candle", "guitar", "button", "sandal", "cap"]
PLACES = [("park", "in"), ("forest", "in"), ("garden", "in"), ("beach", "at"), ("river", "by"), ("farm", "on"),
          ("school", "at"), ("library", "at"), ("market", "at"), ("lake", "by"), ("hill", "on"), ("meadow", "in"),
          ("zoo", "at"), ("playground", "at"), ("backyard", "in"), ("pond", "by"), ("bakery", "at"),
          ("harbor", "at"), ("orchard", "in"), ("barn", "in"), ("museum", "at"), ("train station", "at"),
          ("toy shop", "at"), ("big field", "in"), ("old lighthouse", "by"), ("swimming pool", "at"),
          ("castle", "in"), ("cave", "in"), ("island", "on"), ("jungle", "in"), ("desert", "in"),
          ("village square", "in"),
          ("bridge", "on"), ("waterfall", "by"), ("sunflower field", "in"), ("old mill", "by"), ("campsite", "at")]
OUTDOORS = [p for p in PLACES if p[0] in ("park", "forest", "garden", "beach", "river", "meadow", "hill", "orchard",
                                         "big field", "pond", "lake", "island", "waterfall", "sunflower field")]
PLACE_LOOKS = ["quiet", "busy", "green", "sunny", "big", "old", "peaceful", "noisy", "colorful", "cool", "windy",
               "beautiful", "crowded", "calm", "bright", "shady"]
HOMES = [("village", "in"), ("city", "in"), ("farm", "on"), ("forest", "in"), ("small town", "in"),
         ("hill", "on"), ("seaside town", "in"), ("valley", "in"), ("big house", "in"), ("little cottage", "in"),
         ("island", "on"), ("mountain village", "in")]
TIMES = ["morning", "sunny morning", "rainy afternoon", "cold winter day", "warm summer evening", "windy day",
         "bright spring morning", "quiet evening", "snowy day", "cloudy afternoon", "hot summer day", "foggy morning",
         "Saturday morning", "chilly autumn day", "lazy Sunday afternoon", "starry night", "misty morning",
         "stormy afternoon", "fine spring day", "golden autumn evening"]
SPOTS = ["under the bed", "behind the door", "in the tall grass", "under a big rock", "inside an old shoe",
         "on top of the shelf", "next to the tree", "in the sand", "under the table", "in a pile of leaves",
         "behind the sofa", "in the laundry basket", "under a pillow", "in the toy box", "by the front gate",
         "inside the doghouse", "under the stairs", "in the flower pot", "behind the curtain", "in the car",
         "in the bathtub", "under a bush", "in the mailbox", "behind the fridge", "inside a coat pocket",
         "on the windowsill", "under the rug", "in the garden shed", "next to the fish tank", "in the bread basket"]
RELATIVES = ["mom", "dad", "grandma", "grandpa", "big sister", "big brother", "aunt", "uncle", "cousin",
             "little sister", "little brother"]
ADULTS = ["Mom", "Dad", "Grandma", "Grandpa", "their teacher", "a wise old owl", "the farmer", "the librarian",
          "an old turtle", "the baker", "their neighbor"]
WEATHER_LINES = ["The sun was shining.", "The wind was blowing softly.", "Birds were singing in the trees.",
                 "It was a warm day.", "Small white clouds floated in the sky.", "The air smelled of flowers.",
                 "Leaves danced in the wind.", "It had rained in the night, and the grass was wet.",
                 "The sky was gray, but it was not raining.", "A cool breeze came from the sea.",
                 "Snow covered the ground like a white blanket.", "The sky was clear and blue.",
                 "Bees were buzzing around the flowers.", "The first stars were coming out.",
                 "Fat raindrops tapped on the windows.", "The trees were full of red and gold leaves."]
SIGHTS = ["a tall tree full of singing birds", "a small bridge over a bubbling stream", "a field of yellow flowers",
          "a red barn with a white door", "a family of ducks walking in a line", "a cloud shaped like a rabbit",
          "a squirrel carrying a nut", "an old man feeding pigeons", "a rainbow over the hills",
          "a boat with a blue sail", "a frog sitting on a lily pad", "a cat sleeping in a window",
          "children flying kites", "a horse eating hay", "a tiny snail on a leaf", "a butterfly with orange wings",
          "a fountain in the square", "a baker carrying fresh bread", "a train going over the hill",
          "a garden full of pumpkins", "a deer drinking from a pond", "a bus full of people",
          "apple trees heavy with fruit", "a man playing the violin", "a huge sandcastle",
          "a dog chasing its own tail", "a woman selling balloons", "a nest with three blue eggs",
          "a tractor in a muddy field", "a long line of ants", "a fox running into the woods",
          "an old stone wall covered in moss", "a girl riding a pony", "a kite stuck in a tree",
          "a street musician with a drum", "sheep resting in the shade"]
SURPRISES = ["found a shiny coin on the path", "met a friendly dog who wanted to play",
             "saw a rainbow after a short rain", "heard an owl hooting in the daytime",
             "got caught in the rain and laughed all the way home", "found a smooth stone with a hole in it",
             "saw a hot air balloon float over the trees", "picked a bunch of wild flowers for {a.his} {rel}",
             "helped a lost kitten find its mother", "found a feather as long as {a.his} arm",
             "tasted the sweetest strawberry ever", "watched a ship sail far away",
             "found a message in a bottle", "saw a family of rabbits hopping across the path",
             "learned how to skip stones on the water", "got a free ice cream from a kind man",
             "spotted a tiny turtle crossing the road", "heard a band playing music in the square"]
WISHES = [  # (what, where or None, [(obstacle, fix)], success)
    ("fly a kite", ("hill", "on"), [("there was no wind at all", "waited on top of the hill until a breeze came"),
                                    ("the string was too short", "tied two strings together to make it longer")],
     "the kite went up, up, up into the blue sky"),
    ("build a sandcastle", ("beach", "at"), [("the waves kept washing the sand away",
                                              "built it higher up on the beach, far from the water"),
                                             ("the sand was too dry to stick", "added a little water to the sand")],
     "a tall sandcastle with four towers stood on the beach"),
    ("bake a cake", ("kitchen", "in"), [("there were no eggs in the kitchen", "went next door and asked for two eggs"),
                                        ("the first cake came out flat", "read the recipe again and tried once more")],
     "a sweet, warm cake came out of the oven"),
    ("climb the big hill", None, [("the path was steep and rocky", "took small steps and rested when {a.he} was tired"),
                                  ("{a.his} legs got tired halfway up", "sat down, drank some water, and kept going")],
     "{a.he} stood on top of the hill and could see the whole village"),
    ("catch a fish", ("river", "by"), [("the fish swam away every time", "sat very still and waited"),
                                       ("the line got tangled", "untied the knots one by one")],
     "a small silver fish wiggled on the line, and {a.he} let it swim back into the water"),
    ("paint a picture of the sea", ("beach", "at"), [("the colors mixed into a muddy brown",
                                                      "washed the brush between each color"),
                                                     ("the paper blew away", "put stones on the corners of the paper")],
     "the picture was full of blue waves and white boats"),
    ("plant a garden", ("backyard", "in"), [("the ground was hard and dry", "watered the ground and dug with a shovel"),
                                            ("birds ate the seeds", "put up a little scarecrow")],
     "tiny green plants began to grow in neat rows"),
    ("learn to swim", ("swimming pool", "at"), [("the water felt cold and deep",
                                                 "held on to the side and kicked {a.his} legs first"),
                                                ("{a.he} kept sinking", "practiced floating on {a.his} back")],
     "{a.he} swam all the way across the pool"),
    ("ride a bike", ("park", "in"), [("{a.he} kept falling over", "asked {b.name} to hold the seat for a while"),
                                     ("the bike had a flat tire", "pumped up the tire with {a.his} grandpa")],
     "{a.he} rode all the way down the path without falling"),
    ("make a paper boat", ("pond", "by"), [("the paper kept tearing", "used thicker paper and folded it slowly"),
                                           ("the boat sank at once", "folded the sides up higher")],
     "the little boat floated across the water"),
    ("win the race at school", ("school", "at"), [("{a.he} was not very fast", "practiced running every morning"),
                                                  ("{a.he} tripped at the start", "got up quickly and kept running")],
     "{a.he} crossed the finish line first"),
    ("see a shooting star", ("hill", "on"), [("clouds covered the sky", "waited until the clouds moved away"),
                                             ("{a.he} kept falling asleep", "wrapped up in a warm blanket")],
     "a bright star shot across the dark sky"),
    ("build a tree house", ("backyard", "in"), [("the boards were too heavy", "asked {b.name} to help carry them"),
                                                ("there were not enough nails", "walked to the shop to buy more")],
     "a small wooden house sat high in the old tree"),
    ("sing in the school show", ("school", "at"), [("{a.he} was too shy to sing in front of people",
                                                    "practiced in front of {a.his} family first"),
                                                   ("{a.he} forgot the words", "read the words every night")],
     "everyone clapped when {a.he} finished the song"),
    ("find a four-leaf clover", ("meadow", "in"), [("there were thousands of leaves in the meadow",
                                                    "looked slowly, one small patch at a time"),
                                                   ("it started to rain", "came back on the next sunny day")],
     "{a.he} found a tiny clover with four green leaves"),
]
NEEDS = [  # (what the animal says, what was wrong, how the hero helps)
    ("I am lost, and I cannot find my way home", "was lost", "showed the {animal} the way back home"),
    ("I am stuck up in this tree, and I cannot get down", "was stuck in a tree",
     "helped the {animal} climb down carefully"),
    ("I am so hungry. I have not eaten all day", "was hungry", "shared {a.his} lunch with the {animal}"),
    ("I am cold and wet from the rain", "was cold and wet", "wrapped the {animal} in a warm blanket"),
    ("I have no one to play with", "had no one to play with", "played a game of tag with the {animal}"),
    ("I hurt my leg, and it hurts to walk", "had hurt its leg", "put a soft bandage on the {animal}'s leg"),
    ("I am scared of the dark", "was scared of the dark", "sat with the {animal} and sang a soft song"),
    ("I dropped my food into the river", "had lost its food", "picked some berries for the {animal}"),
    ("The wind blew my little house away", "had lost its house", "helped the {animal} build a new house of sticks"),
]
FRIEND_ANIMALS = "puppy kitten bunny duckling squirrel fox owl hedgehog mouse turtle frog lamb piglet deer".split()
COLLECT = [("shell", "shells"), ("apple", "apples"), ("stone", "stones"), ("flower", "flowers"),
           ("sticker", "stickers"), ("egg", "eggs"), ("leaf", "leaves"), ("coin", "coins"), ("acorn", "acorns"),
           ("berry", "berries"), ("marble", "marbles"), ("cookie", "cookies"), ("feather", "feathers"),
           ("pine cone", "pine cones"), ("button", "buttons"), ("pencil", "pencils"), ("card", "cards")]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"), ("bowl", "bowls"),
              ("plate", "plates"), ("bucket", "buckets")]
COIN = ("coin", "coins")
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
SHOP_ITEMS = [("apple", "apples"), ("pear", "pears"), ("orange", "oranges"), ("cookie", "cookies"),
              ("pencil", "pencils"), ("sticker", "stickers"), ("balloon", "balloons"), ("cupcake", "cupcakes"),
              ("banana", "bananas"), ("plum", "plums"), ("notebook", "notebooks"), ("muffin", "muffins")]
GAMES = ["hide and seek", "tag", "catch", "with the blocks", "a board game", "football", "with the toy trains"]
CHORES = [("clean my room", "cleaned the room"), ("feed the cat", "fed the cat"), ("water the plants",
          "watered the plants"), ("wash the dishes", "washed the dishes"), ("finish my homework",
          "finished the homework"), ("fold the laundry", "folded the laundry")]
WEATHER = {"raining": ("take an umbrella", "jump in the puddles in our boots"),
           "snowing": ("wear our warm coats", "build a snowman"), "sunny": ("wear our hats", "go to the beach"),
           "windy": ("hold on to our hats", "fly a kite"), "cold": ("wear scarves and mittens",
           "drink hot cocoa when we get back"), "foggy": ("stay close together", "walk slowly and carefully")}
FOODS = ["pizza", "apples", "pancakes", "soup", "bananas", "carrots", "cheese", "noodles", "strawberries", "rice",
         "bread with honey", "peas", "grapes", "tomatoes", "cherries", "potatoes", "eggs", "muffins", "oranges",
         "cucumbers", "peaches", "beans", "sandwiches", "pears", "corn"]
FOOD_REASONS = ["they taste so good", "my grandma makes them", "they make me strong", "we eat them on holidays",
                "they are sweet", "I can eat them with my hands"]

# Facts the generated texts, chats and problems all agree on: the model can learn them from any of the three.
ANIMALS = {  # name: (plural, sound or None, legs, home, food, baby, one more fact)
    "cow": ("cows", "moo", 4, "on a farm", "grass", "calf", "gives us milk"),
    "dog": ("dogs", "woof", 4, "in a house with people", "meat and dog food", "puppy", "loves to run and play"),
    "cat": ("cats", "meow", 4, "in a house with people", "fish and meat", "kitten", "likes to sleep in the sun"),
    "duck": ("ducks", "quack", 2, "near a pond", "seeds, plants and bugs", "duckling", "can swim and fly"),
    "sheep": ("sheep", "baa", 4, "on a farm", "grass", "lamb", "gives us wool"),
    "pig": ("pigs", "oink", 4, "on a farm", "almost anything", "piglet", "rolls in the mud to stay cool"),
    "horse": ("horses", "neigh", 4, "on a farm", "grass and hay", "foal", "can run very fast"),
    "hen": ("hens", "cluck", 2, "on a farm", "seeds and corn", "chick", "lays eggs"),
    "frog": ("frogs", "ribbit", 4, "in and near ponds", "flies and bugs", "tadpole", "can jump very far"),
    "owl": ("owls", "hoot", 2, "in a tree", "mice and bugs", "owlet", "is awake at night"),
    "lion": ("lions", "roar", 4, "on the grassland", "meat", "cub", "lives in a group called a pride"),
    "bee": ("bees", "buzz", 6, "in a hive", "nectar from flowers", "larva", "makes honey"),
    "spider": ("spiders", None, 8, "in a web", "flies and other bugs", "spiderling", "spins a web to catch food"),
    "bear": ("bears", "growl", 4, "in the forest", "berries, fish and honey", "cub", "sleeps through the winter"),
    "mouse": ("mice", "squeak", 4, "in a small hole", "seeds and grain", "pup", "is small and very quick"),
    "fish": ("fish", None, 0, "in the water", "small plants and bugs", "fry", "breathes with gills"),
    "snake": ("snakes", "hiss", 0, "in the grass", "mice and eggs", "hatchling", "moves by sliding on its belly"),
    "goat": ("goats", "baa", 4, "on a farm", "grass and leaves", "kid", "is very good at climbing"),
    "rabbit": ("rabbits", None, 4, "in a burrow", "grass and carrots", "kit", "has long ears"),
    "ant": ("ants", None, 6, "in a nest under the ground", "seeds and crumbs", "larva", "can carry heavy things"),
    "butterfly": ("butterflies", None, 6, "in fields and gardens", "nectar from flowers", "caterpillar",
                  "starts life as a caterpillar"),
    "penguin": ("penguins", "squawk", 2, "in cold places by the sea", "fish", "chick", "cannot fly but swims well"),
    "turtle": ("turtles", None, 4, "in ponds and in the sea", "plants and small animals", "hatchling",
               "carries its shell on its back"),
    "elephant": ("elephants", None, 4, "on the grassland", "grass, leaves and fruit", "calf", "has a long trunk"),
}
FARM_ANIMALS = ["cow", "duck", "sheep", "pig", "horse", "hen", "goat"]
JOBS = {  # job: (what they do, where, what they use)
    "baker": ("bakes bread, cakes and cookies", "in a bakery", "a big oven"),
    "doctor": ("helps sick people get better", "in a hospital", "a stethoscope"),
    "teacher": ("helps children learn to read, write and count", "at a school", "books and a board"),
    "farmer": ("grows food and takes care of animals", "on a farm", "a tractor"),
    "firefighter": ("puts out fires and keeps people safe", "at a fire station", "a long hose"),
    "pilot": ("flies airplanes", "at an airport", "an airplane"),
    "cook": ("makes food for people to eat", "in a kitchen", "pots and pans"),
    "mail carrier": ("brings letters and packages to people's homes", "at the post office", "a big bag"),
    "builder": ("builds houses and other buildings", "on a building site", "a hammer"),
    "vet": ("takes care of sick animals", "at an animal clinic", "a stethoscope"),
    "dentist": ("takes care of people's teeth", "at a dental office", "a small mirror"),
    "librarian": ("helps people find books", "in a library", "a computer and many shelves"),
    "fisher": ("catches fish", "on a boat", "a net"),
    "gardener": ("takes care of plants and flowers", "in gardens and parks", "a watering can"),
    "nurse": ("takes care of patients", "in a hospital", "a thermometer"),
    "tailor": ("makes and fixes clothes", "in a small shop", "a needle and thread"),
}
COLOR_OF = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "a strawberry": "red",
            "a carrot": "orange", "coal": "black", "chocolate": "brown", "a lemon": "yellow", "a tomato": "red",
            "a grape": "purple", "a pumpkin": "orange", "milk": "white", "a fire truck": "red",
            "a polar bear": "white", "a frog": "green", "a crow": "black", "a cloud": "white", "the sea": "blue"}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"),
             ("happy", "sad"), ("old", "new"), ("tall", "short"), ("wet", "dry"), ("open", "closed"),
             ("full", "empty"), ("light", "heavy"), ("loud", "quiet"), ("early", "late"), ("in", "out"),
             ("hard", "soft"), ("clean", "dirty"), ("first", "last"), ("near", "far"), ("young", "old")]
SHAPES = {"triangle": 3, "square": 4, "rectangle": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}
BODY = {"eyes": "see", "ears": "hear", "nose": "smell", "mouth": "eat and talk", "hands": "hold things",
        "feet": "walk and run", "teeth": "chew food", "tongue": "taste food"}
SEASONS = {"winter": ["it is cold", "snow can fall", "people wear warm coats and hats",
                      "some animals sleep for a long time"],
           "spring": ["flowers start to bloom", "many baby animals are born", "the days get longer",
                      "it often rains"],
           "summer": ["it is hot", "many people go to the beach", "the days are long", "fruit grows on the trees"],
           "autumn": ["the leaves turn red, orange and yellow", "leaves fall from the trees", "it gets cooler",
                      "farmers pick apples and pumpkins"]}
CATEGORIES = {  # for "how many animals are in this list?"
    "animal": ["cat", "dog", "cow", "horse", "duck", "frog", "owl", "lion", "bear", "mouse", "goat", "pig", "fox"],
    "fruit": ["apple", "pear", "banana", "plum", "grape", "lemon", "cherry", "peach", "mango", "orange"],
    "color": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white"],
    "toy": ["ball", "kite", "doll", "robot", "puzzle", "yo-yo", "top", "drum", "teddy bear"],
}
SPELL_WORDS = sorted({w for w in THINGS + FRIEND_ANIMALS + list(ANIMALS) + COLORS + TRAITS + FOODS + list(JOBS)
                      + [p for p, _ in PLACES] + ["strawberry", "banana", "elephant", "butterfly", "rainbow",
                                                  "mississippi", "bookkeeper", "balloon", "coffee", "tomorrow"]
                      if w.isalpha() and 3 <= len(w) <= 11})


def an(phrase: str) -> str:
    return "an" if phrase[0].lower() in "aeiou" else "a"


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def count(n: int, noun) -> str:
    """count(3, ("apple", "apples")) -> "3 apples"."""
    return f"{n} {noun[0] if n == 1 else noun[1]}"


class Character:
    def __init__(self, name, kind, girl, trait):
        self.name, self.kind, self.trait = name, kind, trait
        self.he, self.him, self.his = ("she", "her", "her") if girl else ("he", "him", "his")
        self.He, self.His = cap(self.he), cap(self.his)
        self.desc, self.a_kind = f"{an(trait)} {trait} {kind}", f"{an(kind)} {kind}"


class Thing:
    def __init__(self, noun, color, look=None):
        words = " ".join(w for w in (look, color, noun) if w)
        self.noun, self.color, self.a, self.the = noun, color, f"{an(words)} {words}", f"the {words}"


class Place:
    def __init__(self, name, prep):
        self.name, self.the, self.at = name, f"the {name}", f"{prep} the {name}"


def make_character(rng, avoid=()) -> Character:
    girl = rng.random() < 0.5
    if rng.random() < 0.65:
        names, kind = (GIRLS, "girl") if girl else (BOYS, "boy")
    else:
        names, kind = PET_NAMES, rng.choice(HERO_ANIMALS)
    return Character(rng.choice([n for n in names if n not in avoid]), kind, girl, rng.choice(TRAITS))


def make_thing(rng) -> Thing:
    return Thing(rng.choice(THINGS), rng.choice(COLORS), rng.choice(LOOKS) if rng.random() < 0.4 else None)


class Say:
    """Picks one of several phrasings and fills in the slots the story has chosen so far."""

    def __init__(self, rng, **slots):
        self.rng, self.slots = rng, slots

    def fill(self, text: str) -> str:
        return text.format(**self.slots)

    def __call__(self, *options: str) -> str:
        return cap(self.fill(self.rng.choice(options)))


OPENINGS = ["Once upon a time, there was {a.desc} named {a.name}.",
            "There once was {a.desc} called {a.name} who lived {home.at}.",
            "{a.name} was {a.desc} who lived {home.at}.",
            "Once there was {a.a_kind} named {a.name}. {a.He} was very {a.trait}.",
            "Long ago, {home.at}, there lived {a.desc} named {a.name}.",
            "In a little house {home.at} lived {a.desc} named {a.name}."]
ENDINGS = ["It was the best day ever.", "{a.name} smiled all the way home.",
           "That night, {a.name} fell asleep with a big smile.", "{a.name} would never forget that day.",
           "It had been a wonderful {time}.", "{a.name} could not wait to tell {a.his} {rel} about it.",
           "And that was how {a.name} spent the best {time} of the year.", "{a.name} felt warm and {good} inside."]


def story_lost(say, a, b):
    say.slots.update(zip(("s1", "s2", "s3"), say.rng.sample(SPOTS, 3)))
    paragraphs = [
        [say(*OPENINGS),
         say("{a.His} favorite toy was {t.a}.", "{a.He} had {t.a} that {a.he} loved very much.",
             "{a.His} {rel} had given {a.him} {t.a} for {a.his} birthday.",
             "{a.He} took {a.his} {t.noun} everywhere {a.he} went.")],
        [say("One {time}, {a.name} could not find {a.his} {t.noun}.", "But one day, the {t.noun} was gone!",
             "One {time}, {a.name} went to play with {a.his} {t.noun}, but it was not there."),
         say("{a.He} felt very {bad}.", "{a.name} was so {bad} that {a.he} wanted to cry.",
             "{a.His} eyes filled with tears."),
         say("{a.He} looked {s1}, but it was not there.", "First, {a.he} looked {s1}. Nothing!",
             "{a.name} searched {s1}, but there was no {t.noun} there."),
         say("Then {a.he} looked {s2}. It was not there either.",
             "Next, {a.he} searched {s2}, but {a.he} still could not find it.",
             "{a.He} even looked {s2}, but the {t.noun} was not there.")],
        [say("Just then, {b.name} came by and asked, \"Why are you so {bad}?\"",
             "{a.His} friend {b.name} saw {a.him} and asked, \"What is wrong?\""),
         say("\"I lost my {t.noun},\" said {a.name}.",
             "\"My {t.noun} is gone,\" {a.name} said. \"I looked everywhere.\""),
         say("\"Don't worry. I will help you look,\" said {b.name}.", "\"Let's look together,\" said {b.name}.")],
        [say("They looked together, and soon {b.name} found the {t.noun} {s3}!",
             "They looked together. At last, {a.name} saw something {t.color} {s3}. It was the {t.noun}!",
             "They looked together, until {b.name} pointed and shouted, \"Look, it is {s3}!\""),
         say("{a.name} hugged {b.name} and said, \"Thank you so much!\"",
             "{a.name} was so {good}. \"Thank you, {b.name}!\" {a.he} said."),
         say("From that day on, {a.name} always put {a.his} {t.noun} in a safe place.",
             "{a.name} learned that a good friend can help you find anything.", *ENDINGS)]]
    qa = [("What did {a.name} lose?", "{a.name} lost {a.his} {t.noun}."),
          ("Who helped {a.name}?", "{b.name} helped {a.name} look for the {t.noun}."),
          ("Where was the {t.noun} found?", "The {t.noun} was found {s3}."),
          ("Where did {a.name} look first?", "{a.name} looked {s1} first.")]
    return paragraphs, "{a.desc} named {a.name} who lost {t.a}", qa


def story_wish(say, a, b):
    what, place, problems, success = say.rng.choice(WISHES)
    obstacle, fix = say.rng.choice(problems)
    if place:
        say.slots["p"] = Place(*place)
    say.slots.update(what=what, obstacle=say.fill(obstacle), fix=say.fill(fix), success=say.fill(success))
    say.slots["Success"] = cap(say.slots["success"])
    paragraphs = [
        [say(*OPENINGS),
         say("More than anything, {a.name} wanted to {what}.", "{a.name} dreamed of the day {a.he} would {what}.",
             "Every day, {a.name} said, \"One day I will {what}!\"")],
        [say("One {time}, {a.he} decided to try.", "So one {time}, {a.he} went to {p.the} to try.",
             "One {time}, {a.name} and {a.his} friend {b.name} went to {p.the} to try."),
         say("But {obstacle}.", "It was not easy, because {obstacle}.", "Sadly, {obstacle}."),
         say("{a.name} felt {bad} and almost gave up.", "{a.He} sat down and sighed.",
             "\"This is too hard,\" said {a.name}.")],
        [say("Then {a.he} had an idea.", "{b.name} came by and said, \"Don't give up! Let's think.\"",
             "After a while, {a.he} thought of something."),
         say("{a.He} {fix}.", "So {a.he} {fix}."),
         say("At last, {success}!", "It worked! {Success}.", "This time, {success}.")],
        [say("{a.name} felt so {good}.", "{a.name} jumped up and down with joy."),
         say("{a.He} learned that if you keep trying, you can do hard things.", *ENDINGS)]]
    qa = [("What did {a.name} want to do?", "{a.name} wanted to {what}."),
          ("What was the problem?", "The problem was that {obstacle}."),
          ("How did {a.name} solve the problem?", "{a.He} {fix}.")]
    return paragraphs, "{a.desc} named {a.name} who wanted to {what}", qa


def story_friend(say, a, b):
    need, problem, fix = say.rng.choice(NEEDS)
    say.slots["animal"] = say.rng.choice(FRIEND_ANIMALS)
    say.slots.update(need=need, problem=problem, fix=say.fill(fix))
    paragraphs = [
        [say(*OPENINGS),
         say("One {time}, {a.name} went for a walk to {p.the}.", "{a.name} was playing {p.at} one {time}.")],
        [say("There {a.he} met a little {animal}.", "Suddenly, {a.he} heard a small voice. It was a little {animal}."),
         say("The {animal} looked very {bad}.", "The little {animal} was crying."),
         say("\"What is wrong?\" asked {a.name}.", "\"Hello, little {animal}. Why are you {bad}?\" asked {a.name}."),
         say("\"{need},\" said the {animal}.", "The {animal} said, \"{need}.\"")],
        [say("\"I can help you,\" said {a.name}.", "{a.name} wanted to help.", "{a.name} knew just what to do."),
         say("{a.He} {fix}.", "So {a.name} {fix}."),
         say("The {animal} was very {good}.", "The little {animal} smiled for the first time that day.")],
        [say("\"Thank you,\" said the {animal}. \"Will you be my friend?\"",
             "\"You are very kind,\" said the {animal}. \"Can we be friends?\""),
         say("\"Yes!\" said {a.name}.", "\"Of course!\" said {a.name} with a smile."),
         say("From then on, {a.name} and the little {animal} played together every day.",
             "They became the best of friends.", *ENDINGS)]]
    qa = [("Who did {a.name} meet?", "{a.name} met a little {animal}."),
          ("What was wrong with the {animal}?", "The {animal} {problem}."),
          ("How did {a.name} help?", "{a.He} {fix}.")]
    return paragraphs, "{a.desc} named {a.name} who helps a little {animal}", qa


def story_share(say, a, b):
    say.slots["adult"] = say.rng.choice(ADULTS)
    say.slots["Adult"] = cap(say.slots["adult"])
    paragraphs = [
        [say("{a.name} and {b.name} were playing {p.at}.", "One {time}, {a.name} and {b.name} went to play {p.at}."),
         say("They both wanted to play with {t.the}.", "There was only one {t.noun}, and they both wanted it.")],
        [say("\"It's mine!\" said {a.name}.", "\"I had it first!\" shouted {a.name}."),
         say("\"No, it's mine!\" said {b.name}.", "\"No, I want it!\" cried {b.name}."),
         say("They pulled and pulled, and both of them felt {bad}.",
             "They began to argue, and soon they were both {bad}.")],
        [say("Then {adult} came over.", "Just then, {adult} walked by."),
         say("\"Why don't you take turns?\" said {adult}.",
             "\"You can play with it together,\" said {adult}. \"Sharing is more fun.\""),
         say("{a.name} and {b.name} looked at each other.", "{a.name} thought about it for a moment.")],
        [say("So {a.name} played with the {t.noun} first, and then {b.name} had a turn.",
             "They decided to play with the {t.noun} together."),
         say("Soon they were laughing and having fun.", "It was much more fun than fighting.",
             "{a.name} laughed, and {b.name} laughed too.", "Playing together, the {t.noun} seemed even better."),
         say("They learned that sharing makes playing more fun.", "After that day, they always shared their toys.",
             "{a.name} and {b.name} stayed {p.at} until the sun went down.", *ENDINGS)]]
    qa = [("What did {a.name} and {b.name} both want?", "They both wanted {t.the}."),
          ("Who helped them stop arguing?", "{Adult} helped them."),
          ("What did they learn?", "They learned that sharing makes playing more fun.")]
    return paragraphs, "two friends, {a.name} and {b.name}, who both want {t.a}", qa


def story_journey(say, a, b):
    sights = say.rng.sample(SIGHTS, 3)
    say.slots.update(s1=sights[0], s2=sights[1], s3=sights[2])
    say.slots["surprise"] = say.fill(say.rng.choice(SURPRISES))
    middle = [say("On the way, {a.he} saw {s1}.", "First, they passed {s1}."),
              say("Then {a.he} saw {s2}.", "After that, they saw {s2}.")]
    if say.rng.random() < 0.5:
        middle.append(say("{a.name} also saw {s3}.", "Further on, there was {s3}."))
    paragraphs = [
        [say(*OPENINGS),
         say("One {time}, {a.name} went on a walk to {p.the} with {a.his} {rel}.",
             "One {time}, {a.name} and {a.his} {rel} went on a trip to {p.the}.")],
        middle,
        [say("Then something special happened: {a.name} {surprise}.", "{p.at}, {a.name} {surprise}."),
         say("{a.He} felt very {good}.", "\"What a day!\" said {a.name}.")],
        [say("When they got home, {a.name} told {b.name} all about it.",
             "That evening, {a.name} drew a picture of everything {a.he} had seen."),
         say("\"Can we go again tomorrow?\" {a.he} asked.", *ENDINGS)]]
    qa = [("Where did {a.name} go?", "{a.name} went to {p.the} with {a.his} {rel}."),
          ("What did {a.name} see first?", "{a.He} saw {s1} first."),
          ("Who went with {a.name}?", "{a.His} {rel} went with {a.him}.")]
    return paragraphs, "{a.desc} named {a.name} on a trip to {p.the}", qa


def story_collect(say, a, b):
    rng = say.rng
    item = rng.choice(COLLECT)
    say.slots.update(items=item[1], box=rng.choice(CONTAINERS)[0], p=Place(*rng.choice(OUTDOORS)))
    start = rng.randrange(len(DAYS) - 3)
    total = rng.randint(1, 6)
    say.slots["first"] = DAYS[start]
    days = [say("On {first}, {a.he} found " + spoken(rng, total, item) + ".")]
    for day in DAYS[start + 1:start + rng.randint(2, 4)]:
        found = rng.randint(1, 6)
        more = f"{spoken(rng, found, ('', ''))}more {item[0] if found == 1 else item[1]}"
        days.append(rng.choice([f"On {day}, {a.he} found {more}. Now {a.he} had {spoken(rng, total + found, item)}.",
                                f"On {day}, {a.he} found {more}, and {total} + {found} = {total + found}."]))
        total += found
    paragraphs = [[say(*OPENINGS),
                   say("{a.name} loved to collect {items}.", "{a.name} liked to look for {items} {p.at}.")], days]
    if total > 1 and rng.random() < 0.5:
        given = rng.randint(1, total - 1)
        paragraphs.append([f"{a.He} gave {spoken(rng, given, item)} to {b.name}, "
                           f"so {a.he} had {spoken(rng, total - given, item)} left.",
                           say("\"Thank you!\" said {b.name}.", "{b.name} smiled.")])
        total -= given
    say.slots["total"] = count(total, item)
    paragraphs.append([say("{a.name} put all the {items} in a {box} and counted them again: {total}!",
                           "At the end, {a.name} had {total} in {a.his} {box}.")])
    qa = [("How many {items} did {a.name} have at the end?", "{a.name} had {total} at the end."),
          ("What did {a.name} collect?", "{a.name} collected {items}."),
          ("On which day did {a.name} start?", "{a.name} started on {first}.")]
    return paragraphs, "{a.desc} named {a.name} who collects {items}", qa


def spoken(rng, n, noun) -> str:
    """A count as a story would say it: small numbers often as words."""
    text = count(n, noun)
    return NUMBER_WORDS[n] + text[len(str(n)):] if n < len(NUMBER_WORDS) and rng.random() < 0.5 else text


RECIPES = [("pancakes", ["flour", "milk", "two eggs", "a pinch of salt"], "cooked them in a hot pan"),
           ("a fruit salad", ["apples", "bananas", "grapes", "a little honey"], "cut the fruit into small pieces"),
           ("cookies", ["flour", "butter", "sugar", "chocolate chips"], "baked them in the oven"),
           ("vegetable soup", ["carrots", "potatoes", "peas", "water"], "let it cook slowly in a big pot"),
           ("a pizza", ["dough", "tomato sauce", "cheese", "mushrooms"], "baked it until the cheese bubbled"),
           ("lemonade", ["lemons", "cold water", "sugar", "ice"], "stirred it in a big jug"),
           ("sandwiches", ["bread", "cheese", "tomatoes", "lettuce"], "cut them into little triangles"),
           ("a banana bread", ["ripe bananas", "flour", "eggs", "butter"], "baked it for an hour")]
COMFORTS = ["told {a.him} a funny story", "sang {a.his} favorite song", "made two cups of hot cocoa",
            "built a blanket fort with {a.him}", "held {a.his} hand", "counted the seconds between the thunder"]


def story_visit(say, a, b):
    job = say.rng.choice(list(JOBS))
    does, where, uses = JOBS[job]
    say.slots.update(job=job, a_job=f"{an(job)} {job}", does=does, where=where, uses=uses)
    paragraphs = [
        [say(*OPENINGS), say("{a.His} {rel} was {a_job}.", "{a.name}'s {rel} worked as {a_job}.")],
        [say("One {time}, {a.name} went along to work.", "One {time}, {a.his} {rel} said, \"Come to work with me!\""),
         say("The work was {where}.", "They spent the whole day {where}."),
         say("{a.name} saw that {a_job} {does}.", "{a.He} learned that {a_job} {does}."),
         say("{a.His} {rel} showed {a.him} {uses} and said, \"I use this every day.\"",
             "{a.name} even got to hold {uses}.")],
        [say("{a.name} asked many questions, and {a.his} {rel} answered every one.",
             "It was hard work, but {a.name} helped as much as {a.he} could."),
         say("At the end of the day, {a.name} said, \"When I grow up, I want to be {a_job} too!\"", *ENDINGS)]]
    qa = [("What job does {a.name}'s {rel} have?", "{a.His} {rel} is {a_job}."),
          ("What does {a_job} do?", "{a_job} {does}."), ("What did {a.name} see at work?", "{a.He} saw {uses}.")]
    return paragraphs, "{a.desc} named {a.name} who goes to work with {a_job}", qa


def story_party(say, a, b):
    rng = say.rng
    age, guests = rng.randint(4, 10), [b.name] + [make_character(rng, avoid={a.name, b.name}).name]
    cupcakes = rng.randint(len(guests) + 3, 20)
    gift, cake = make_thing(rng), rng.choice(COLORS)
    say.slots.update(age=age, guests=" and ".join(guests), gift=gift.a, cupcakes=cupcakes,
                     eaten=len(guests) + 1, left=cupcakes - len(guests) - 1, cake=cake, a_cake=f"{an(cake)} {cake}",
                     game=rng.choice(GAMES))
    paragraphs = [
        [say("It was {a.name}'s birthday, and {a.he} was turning {age}.",
             "Today was a special day: {a.name} was {age} years old!"),
         say("{guests} came to the party.", "{a.His} friends {guests} came to celebrate.")],
        [say("{b.name} gave {a.him} {gift}.", "{b.name} brought {gift} as a present."),
         say("There was a big {cake} cake with {age} candles.", "{a.His} {rel} made {a_cake} cake with {age} candles."),
         say("{a.name} blew out all {age} candles and made a wish.",
             "Everyone sang, and {a.name} blew out the candles.")],
        [say("There were {cupcakes} cupcakes. The {eaten} children ate one each, so {cupcakes} - {eaten} = {left} "
             "were left."),
         say("Then they played {game}.", "After the cake, they played {game} in the garden.")],
        [say("\"This is the best birthday ever!\" said {a.name}.", *ENDINGS)]]
    qa = [("How old was {a.name} turning?", "{a.name} was turning {age}."),
          ("What did {b.name} give {a.name}?", "{b.name} gave {a.him} {gift}."),
          ("How many candles were on the cake?", "There were {age} candles on the cake."),
          ("How many cupcakes were left?", "{left} cupcakes were left.")]
    return paragraphs, "{a.name}'s birthday party", qa


def story_learn(say, a, b):
    animal = say.rng.choice(list(ANIMALS))
    plural, sound, legs, home, food, baby, fact = ANIMALS[animal]
    say.slots.update(animal=animal, an_animal=f"{an(animal)} {animal}", plural=plural, lives=home, food=food,
                     baby=f"{an(baby)} {baby}", fact=fact, legs=number_word(legs) if legs else "no")
    say.slots["An_animal"] = cap(say.slots["an_animal"])
    lines = [say("\"What does {an_animal} eat?\" asked {a.name}. \"It eats {food},\" said {a.his} {rel}."),
             say("\"Where does it live?\" \"{An_animal} lives {lives}.\""),
             say("\"And what is a baby {animal} called?\" \"A baby {animal} is called {baby}.\""),
             say("\"How many legs does it have?\" \"It has {legs} legs.\"")]
    paragraphs = [
        [say(*OPENINGS), say("{a.name} loved {plural} more than any other animal.",
                             "One {time}, {a.name} and {a.his} {rel} read a book about {plural}.")],
        [say("\"Did you know that {an_animal} {fact}?\" said {a.his} {rel}.")] + say.rng.sample(lines, 3),
        [say("{a.name} listened to every word.", "\"Wow!\" said {a.name}. \"I love {plural}!\""),
         say("That night, {a.he} dreamed about {plural}.", "{a.He} wanted to learn about every animal in the world.")]]
    qa = [("What does {an_animal} eat?", "{an_animal} eats {food}."),
          ("What is a baby {animal} called?", "A baby {animal} is called {baby}."),
          ("What animal did {a.name} learn about?", "{a.name} learned about {plural}.")]
    return paragraphs, "{a.desc} named {a.name} who learns about {plural}", qa


def story_cook(say, a, b):
    dish, ingredients, step = say.rng.choice(RECIPES)
    say.slots.update(dish=dish, things=", ".join(ingredients[:-1]) + " and " + ingredients[-1], step=step,
                     spill=say.rng.choice(ingredients),
                     taste=say.rng.choice(["delicious", "sweet", "yummy", "perfect"]))
    middle = [say("First, they got {things}.", "They put {things} on the table."),
              say("{a.name} mixed everything in a big bowl.", "{a.name} helped to stir and measure."),
              say("Then they {step}.")]
    if say.rng.random() < 0.5:
        middle.insert(2, say("Oops! {a.name} spilled some {spill}. They laughed and cleaned it up together."))
    paragraphs = [
        [say(*OPENINGS), say("One {time}, {a.name} and {a.his} {rel} decided to make {dish}.")], middle,
        [say("Soon the {dish} was ready. It tasted {taste}!", "When it was ready, everyone said it was {taste}."),
         say("{a.name} shared some with {b.name}.", "{a.name} saved some for {b.name}.", *ENDINGS)]]
    qa = [("What did {a.name} make?", "{a.name} made {dish} with {a.his} {rel}."),
          ("What did they use?", "They used {things}."), ("Who helped {a.name}?", "{a.His} {rel} helped {a.him}.")]
    return paragraphs, "{a.name} making {dish} with {a.his} {rel}", qa


def story_storm(say, a, b):
    indoors = [s for s in SPOTS if s.startswith(("under the", "behind the"))]
    say.slots.update(spot=say.rng.choice(indoors), comfort=say.fill(say.rng.choice(COMFORTS)),
                     after=say.rng.choice(["a bright rainbow", "big puddles everywhere", "a sky full of stars",
                                           "fresh green leaves shining in the sun"]))
    paragraphs = [
        [say(*OPENINGS), say("One {time}, a big storm came.", "One {time}, dark clouds filled the sky.")],
        [say("The wind howled, and thunder boomed.", "Rain poured down, and lightning flashed.",
             "{a.name} heard the thunder boom over the {home.name}.",
             "The windows of {a.his} house rattled in the wind."),
         say("{a.name} felt scared and hid {spot}.", "{a.name} was so scared that {a.he} hid {spot}."),
         say("{a.His} {rel} found {a.him} and {comfort}.", "Then {a.his} {rel} came and {comfort}."),
         say("\"Storms are loud, but we are safe inside,\" said {a.his} {rel}.")],
        [say("After a while, the rain stopped.", "Soon the storm was over.", "By {a.his} bedtime, the storm was gone.",
             "The storm moved away over the {home.name}."),
         say("{a.name} looked outside and saw {after}.", "When {a.he} looked out of the window, {a.he} saw {after}."),
         say("{a.He} was not scared anymore.", "\"Storms are not so bad,\" {a.he} said.", *ENDINGS)]]
    qa = [("Why did {a.name} hide?", "{a.He} was scared of the storm."),
          ("Where did {a.name} hide?", "{a.He} hid {spot}."),
          ("What did {a.his} {rel} do?", "{a.His} {rel} {comfort}.")]
    return paragraphs, "{a.desc} named {a.name} who is scared of a storm", qa


STORIES = [story_lost, story_wish, story_friend, story_share, story_journey, story_collect, story_visit, story_party,
           story_learn, story_cook, story_storm]


def english_story(rng):
    """(text, what it is about, [(question, answer)], [the names and place `about` asks for]) for one story."""
    a = make_character(rng)
    b = make_character(rng, avoid={a.name})
    say = Say(rng, a=a, b=b, t=make_thing(rng), p=Place(*rng.choice(PLACES)), home=Place(*rng.choice(HOMES)),
              time=rng.choice(TIMES), rel=rng.choice(RELATIVES), good=rng.choice(GOOD_FEELINGS),
              bad=rng.choice(BAD_FEELINGS))
    story = rng.choice(STORIES)
    paragraphs, about, qa = story(say, a, b)
    asked = [word for slot, word in (("{a.name}", a.name), ("{b.name}", b.name), ("{p.the}", say.slots["p"].name))
             if slot in about]
    if story is not story_storm and rng.random() < 0.3:
        paragraphs[0].insert(1, rng.choice(WEATHER_LINES))
    place = say.slots["p"]
    where = [para for para in paragraphs if any(place.the in s for s in para)]
    if where and rng.random() < 0.3:  # describe the place where the story first goes there
        where[0].append(f"The {place.name} was {' and '.join(rng.sample(PLACE_LOOKS, 2))} that day.")
    qa.append(("Who is the story about?", "The story is about {a.name}, {a.desc}."))
    text = "\n\n".join(" ".join(p) for p in paragraphs)
    return text, say.fill(about), [(say.fill(q), cap(say.fill(ans))) for q, ans in qa], asked


def english_dialogue(rng) -> str:
    a = make_character(rng)
    b = make_character(rng, avoid={a.name})
    scene = rng.randrange(5)
    if scene == 0:
        item, price, n = rng.choice(SHOP_ITEMS), rng.randint(1, 9), rng.randint(2, 9)
        lines = [f"{a.name} went to the shop to buy some {item[1]}.",
                 f"\"Hello! How much is one {item[0]}?\" asked {a.name}.",
                 f"\"One {item[0]} costs {count(price, COIN)},\" said the shopkeeper.",
                 f"\"Then I would like {n}, please,\" said {a.name}.",
                 rng.choice([f"\"That will be {count(n * price, COIN)},\" said the shopkeeper.",
                             f"The shopkeeper counted: {n} times {price} is {n * price}. "
                             f"\"That will be {n * price} coins, please.\""]),
                 rng.choice([f"{a.name} paid and said, \"Thank you! Have a nice day!\"",
                             f"{a.name} gave the shopkeeper {n * price} coins and carried the {item[1]} home."])]
    elif scene == 1:
        game, (chore, done) = rng.choice(GAMES), rng.choice(CHORES)
        lines = [f"\"Do you want to play {game}?\" asked {a.name}.",
                 f"\"Yes!\" said {b.name}. \"But first I have to {chore}.\"",
                 rng.choice([f"\"I can help you,\" said {a.name}.", f"\"Let's do it together,\" said {a.name}."]),
                 f"So they {done} together. " + rng.choice(["It went much faster with two.", f"{a.name} worked hard.",
                                                            f"{b.name} said it was the fastest job ever."]),
                 f"Then they played {game} until it was time for dinner."]
    elif scene == 2:
        lines = favorite_talk(rng, a, b)
    elif scene == 3:
        weather, (need, then) = rng.choice(list(WEATHER.items()))
        lines = [f"\"Look outside, {b.name}! It is {weather},\" said {a.name}.",
                 f"\"Then we should {need},\" said {b.name}.",
                 f"\"And after our walk, we can {then}!\" said {a.name}.",
                 rng.choice(["\"That is a great idea!\"", "\"Yes, let's go!\""]) + f" said {b.name}."]
    else:
        thing, spot = make_thing(rng), rng.choice(SPOTS)
        lines = [f"\"{b.name}, have you seen my {thing.noun}?\" asked {a.name}.",
                 f"\"Is it {thing.a}?\" asked {b.name}.", "\"Yes, that is the one!\"",
                 f"\"I saw it {spot} this morning,\" said {b.name}.",
                 f"{a.name} looked {spot}, and there it was.",
                 rng.choice([f"\"Thank you, {b.name}!\" said {a.name}.", f"{a.name} gave {b.name} a big hug."])]
    return " ".join(lines)


def favorite_talk(rng, a, b):
    topic = rng.randrange(4)
    if topic == 0:
        mine, theirs = rng.sample(sorted(set(COLOR_OF.values())), 2)
        why = rng.choice([k for k, v in COLOR_OF.items() if v == mine])
        return [f"\"What is your favorite color?\" asked {a.name}.",
                f"\"I like {theirs} best,\" said {b.name}. \"What about you?\"",
                f"\"My favorite is {mine},\" said {a.name}, \"because {why} is {mine}.\""]
    if topic == 1:
        mine, theirs = rng.sample(FOODS, 2)
        return [f"\"What food do you like most?\" asked {b.name}.",
                f"\"I love {mine}, because {rng.choice(FOOD_REASONS)},\" said {a.name}.",
                f"\"I like {theirs},\" said {b.name}. \"Let's eat together one day!\""]
    if topic == 2:
        animal = rng.choice(list(ANIMALS))
        plural, fact = ANIMALS[animal][0], ANIMALS[animal][6]
        return [f"\"What is your favorite animal?\" asked {a.name}.",
                f"\"I like {plural} best,\" said {b.name}.", f"\"Why?\" asked {a.name}.",
                f"\"Because {an(animal)} {animal} {fact},\" said {b.name}. \"Isn't that amazing?\""]
    season = rng.choice(list(SEASONS))
    return [f"\"Which season do you like best?\" asked {a.name}.",
            f"\"I like {season},\" said {b.name}, \"because in {season} {rng.choice(SEASONS[season])}.\"",
            f"\"I like {season} too!\" said {a.name}." if rng.random() < 0.5
            else f"\"I like {rng.choice([s for s in SEASONS if s != season])} more,\" said {a.name} with a smile."]


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def animal_fact_phrasings(animal) -> list:
    """The true sentences the generated world knows about one animal: for each fact, its phrasings."""
    plural, sound, legs, home, food, baby, fact = ANIMALS[animal]
    the, A = f"{an(animal)} {animal}", cap(f"{an(animal)} {animal}")
    facts = [[f"{A} lives {home}.", f"{cap(plural)} live {home}."],
             [f"{A} eats {food}.", f"{cap(plural)} eat {food}."],
             [f"A baby {animal} is called {an(baby)} {baby}.", f"The baby of {the} is called {an(baby)} {baby}."],
             [f"{A} {fact}."],
             [f"{A} has {number_word(legs)} legs." if legs else f"{A} has no legs.",
              f"{cap(plural)} have {number_word(legs)} legs." if legs else f"{cap(plural)} have no legs."]]
    if sound:
        facts.append([f"{A} says \"{sound}\".", f"{cap(plural)} say \"{sound}\".",
                      f"The sound {the} makes is \"{sound}\"."])
    return facts


def animal_facts(rng, animal):
    """The true sentences about one animal, each in one of its wordings."""
    return [rng.choice(phrasings) if len(phrasings) > 1 else phrasings[0]
            for phrasings in animal_fact_phrasings(animal)]


def english_facts(rng) -> str:
    topic = rng.randrange(9)
    if topic in (0, 1):
        animal = rng.choice(list(ANIMALS))
        facts = animal_facts(rng, animal)
        rng.shuffle(facts)
        plural = ANIMALS[animal][0]
        intro = rng.choice([f"Let us learn about {plural}.", f"Here are some facts about {plural}.",
                            f"Do you know about {plural}?", ""])
        return " ".join(s for s in [intro] + facts[:rng.randint(3, len(facts))] if s)
    if topic == 2:
        x, y = rng.sample([k for k, v in ANIMALS.items() if v[2]], 2)
        lx, ly = ANIMALS[x][2], ANIMALS[y][2]
        return (f"{cap(an(x))} {x} has {lx} legs, and {an(y)} {y} has {ly} legs. "
                f"Together they have {lx} + {ly} = {lx + ly} legs. "
                + (f"{cap(an(x))} {x} has more legs." if lx > ly else f"{cap(an(y))} {y} has more legs." if ly > lx
                   else "They have the same number of legs."))
    if topic == 3:
        jobs = rng.sample(list(JOBS), rng.randint(1, 3))
        out = []
        for job in jobs:
            does, where, uses = JOBS[job]
            A = cap(f"{an(job)} {job}")
            out += [f"{A} {does}.",
                    rng.choice([f"{A} works {where}.", f"Most of the day, {an(job)} {job} is {where}."]),
                    rng.choice([f"{A} uses {uses}.", f"To do the work, {an(job)} {job} needs {uses}."])]
        return " ".join(out)
    if topic == 4:
        things = rng.sample(list(COLOR_OF), rng.randint(3, 6))
        return rng.choice(["Everything around us has a color. ", "Colors are everywhere. ", ""]) + \
            " ".join(f"{cap(t)} is {COLOR_OF[t]}." for t in things)
    if topic == 5:
        pairs = rng.sample(OPPOSITES, rng.randint(3, 5))
        return "Many words have opposites. " + " ".join(
            rng.choice([f"The opposite of {x} is {y}.", f"{cap(x)} is the opposite of {y}."]) for x, y in pairs)
    if topic == 6:
        shapes = rng.sample(list(SHAPES), 3)
        return " ".join(f"{cap(an(s))} {s} has {number_word(SHAPES[s])} sides and {number_word(SHAPES[s])} corners."
                        for s in shapes) + rng.choice([" A circle is round, so it has no corners.", ""])
    if topic == 7:
        season = rng.choice(list(SEASONS))
        order = list(SEASONS)
        after = order[(order.index(season) + 1) % 4]
        facts = rng.sample(SEASONS[season], 3)
        return " ".join([f"{cap(season)} is one of the four seasons."] + [f"In {season}, {f}." for f in facts]
                        + [f"After {season} comes {after}."])
    parts = rng.sample(list(BODY), 4)
    return "Our bodies help us every day. " + " ".join(f"We use our {p} to {BODY[p]}." for p in parts)


def english_numbers(rng) -> str:
    """Short explanations of adding, taking away, groups and even numbers, with correct sums."""
    a, item = make_character(rng), rng.choice(COLLECT)
    kind = rng.randrange(4)
    if kind == 0:
        x, y = rng.randint(1, 9), rng.randint(1, 9)
        return (rng.choice(["Adding means putting things together. ", "Here is how adding works. ", ""]) +
                f"{a.name} has {count(x, item)}. "
                f"{a.His} friend gives {a.him} {y} more. Now {a.name} has {count(x + y, item)}, "
                f"because {x} + {y} = {x + y}.")
    if kind == 1:
        x = rng.randint(2, 12)
        y = rng.randint(1, x - 1)
        return (rng.choice(["Taking away means making a group smaller. ", "Here is how taking away works. ", ""]) +
                f"{a.name} had {count(x, item)}. "
                f"{a.He} gave {y} away. Now {a.he} has {count(x - y, item)}, because {x} - {y} = {x - y}.")
    if kind == 2:
        g, k = rng.randint(2, 6), rng.randint(2, 6)
        box = rng.choice(CONTAINERS)
        return (f"{a.name} has {count(g, box)}. In each {box[0]} there are {count(k, item)}. "
                f"To find how many {item[1]} there are, we can add {k} again and again, "
                f"{' + '.join([str(k)] * g)} = {g * k}, or we can multiply: {g} * {k} = {g * k}. "
                f"So there are {count(g * k, item)} in all.")
    n = rng.randint(1, 40)
    parity = "even" if n % 2 == 0 else "odd"
    return (f"{n} is {an(parity)} {parity} number. Counting by twos from {n} gives "
            f"{', '.join(str(i) for i in range(n, n + 10, 2))}, and these are all {parity} numbers too. "
            f"The number after {n} is {n + 1}, and the number before {n} is {n - 1}.")


def sums_drill(rng) -> str:
    """A line of right sums of the sizes the reasoning problems use: a number and a digit, two numbers up to
    thirty, or a times-table entry."""
    sums = []
    for _ in range(rng.randint(6, 10)):
        kind = rng.randrange(4)
        if kind == 0:
            x, y = rng.randint(1, 40), rng.randint(1, 9)
        elif kind == 1:
            x, y = rng.randint(1, 30), rng.randint(1, 30)
        elif kind == 2:
            x, y = rng.randint(1, 6), rng.choice([2, 4, 2, 3, 4, 5, 6])
            sums.append(f"{x} * {y} = {x * y}.")
            continue
        else:
            x, y = rng.randint(1, 12), rng.randint(1, 9)
        op = "-" if rng.random() < 0.4 else "+"
        x, y = (max(x, y), min(x, y)) if op == "-" else (x, y)
        sums.append(f"{x} {op} {y} = {OPERATIONS[op](x, y)}.")
    return " ".join(sums)


def worked_problem(rng, avoid=()) -> str:
    """A reasoning problem as plain text, worked as in r1's traces: question, one step a line, the answer.
    Never one whose question is in `avoid` (the held-out problems and the README's example)."""
    problems, weights = zip(*R1_PROBLEMS)
    while True:
        question, steps, reply, _ = rng.choices(problems, weights)[0](rng, Work())
        if question not in avoid:
            return "\n".join([question, *steps, reply])


def who_has(rng) -> str:
    """A few children with a few things each, then questions answered from the text: a name and a number to
    find and copy from earlier in the document."""
    people, items = [], rng.sample(COLLECT, 4)
    for i in range(rng.randint(2, 4)):
        people.append((make_character(rng, avoid={p.name for p, _, _ in people}), rng.randint(1, 20), items[i]))
    told = [f"{p.name} has {count(n, item)}." for p, n, item in people]
    asked = []
    for p, n, item in rng.sample(people, rng.randint(1, len(people))):
        asked.append(rng.choice([f"How many {item[1]} does {p.name} have? {p.name} has {count(n, item)}.",
                                 f"Who has the {item[1]}? {p.name} has {count(n, item)}.",
                                 f"What does {p.name} have? {p.He} has {count(n, item)}."]))
    return " ".join(told + asked)


def quiz(rng) -> str:
    """Questions about the world, each followed by its answer: the lookup a chat about it asks of the model
    (the questions and answers of the chats' facts, as plain text)."""
    lines = []
    for _ in range(rng.randint(3, 6)):
        turns, _ = rng.choice([task_animal, task_animal, task_world])(rng)
        lines.append(f"{turns[0][1]} {turns[1][1]}")
    return "\n".join(lines)


DOCUMENT_MIX = [(english_story, 30), (english_dialogue, 8), (english_facts, 8), (english_numbers, 5),
                (who_has, 13), (sums_drill, 6), (worked_problem, 30), (quiz, 15)]
# shares of the pretraining documents (by bytes, before quiz: about 21% worked problems, 9% who-has-what, 2% sums;
# 23% sums measured no better)


def english_document(rng, avoid=()) -> str:
    """One pretraining document: a story, dialogue, explanation, line of sums or worked problem."""
    makers, weights = zip(*DOCUMENT_MIX)
    make = rng.choices(makers, weights)[0]
    if make is english_story:
        return english_story(rng)[0]
    return make(rng, avoid) if make is worked_problem else make(rng)


# Chats (sft): each task returns (turns, check): turns [(role, content), ...] ending with an assistant turn, and
# how evaluate.chat_report scores a reply to its last message: {"type": ..., "replies": [the right replies]} (every
# sentence of a reply must be a sentence of one of them) or {"type": ..., "mentions": [words the reply must name]}.
# english_chat opens every reply with an empty think block (think_reply), as Qwen3 writes a reply it does not
# reason about: the model learns to reason where a problem asks for it, and to answer a chat at once.

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly assistant. Keep your answers short and clear.",
                  "You are a kind helper for young children. Use simple words.",
                  "You are a helpful assistant who knows about animals, numbers, words and stories.",
                  "Answer the user's questions briefly and correctly.", "You are a cheerful chat assistant."]
SMALL_TALK = [  # (messages, replies, type)
    (["Hi!", "Hello!", "Hey there!", "Hello, assistant.", "Hi there."],
     ["Hello! How can I help you today?", "Hi! What would you like to talk about?",
      "Hello! It is nice to meet you. What can I do for you?"], "greeting"),
    (["Good morning!"], ["Good morning! I hope you have a wonderful day. How can I help?"], "greeting"),
    (["Good night!"], ["Good night! Sleep well and have sweet dreams."], "greeting"),
    (["How are you?", "How are you today?"],
     ["I am doing well, thank you for asking! How can I help you?", "I am fine, thanks! What shall we talk about?"],
     "small talk"),
    (["What is your name?", "Who are you?", "Tell me about yourself."],
     ["I am a small chat assistant. I can answer simple questions, do sums, spell words and tell short stories."],
     "small talk"),
    (["What can you do?", "How can you help me?"],
     ["I can answer questions about animals, colors and jobs, do small sums, spell and count letters, "
      "rewrite sentences, and tell you short stories."], "small talk"),
    (["I am bored.", "I have nothing to do."],
     ["How about a short story? Or I can give you a fun number puzzle. Just ask!"], "small talk"),
    (["I feel sad today."],
     ["I am sorry you feel sad. It is okay to feel that way sometimes. Would you like to hear a happy story?"],
     "small talk"),
    (["Tell me a joke.", "Do you know a joke?"],
     ["Why did the cat sit on the computer? To keep an eye on the mouse!",
      "What do you call a sleeping bull? A bulldozer!", "Why are fish so smart? Because they live in schools!"],
     "small talk"),
]
THANKS = (["Thank you!", "Thanks a lot.", "Thanks!", "Great, thank you."],
          ["You're welcome!", "You are welcome! Happy to help.", "Any time! Have a nice day."], "greeting")
BYE = (["Bye!", "Goodbye!", "See you later."], ["Goodbye! Have a great day!", "Bye! Come back any time."], "greeting")


def exchange(rng, talk):
    messages, replies, kind = talk
    return [("user", rng.choice(messages)), ("assistant", rng.choice(replies))], dict(type=kind, replies=replies)


def task_small_talk(rng):
    return exchange(rng, rng.choice(SMALL_TALK + [THANKS, BYE]))


def task_animal(rng):
    animal = rng.choice(list(ANIMALS))
    plural, sound, legs, home, food, baby, fact = ANIMALS[animal]
    a, A = f"{an(animal)} {animal}", cap(f"{an(animal)} {animal}")
    asks = [([f"How many legs does {a} have?", f"How many legs do {plural} have?"],
             f"{A} has {legs} legs." if legs else f"{A} has no legs."),
            ([f"Where does {a} live?", f"Where do {plural} live?"], f"{A} lives {home}."),
            ([f"What does {a} eat?", f"What do {plural} eat?"], f"{A} eats {food}."),
            ([f"What is a baby {animal} called?", f"What do you call a baby {animal}?"],
             f"A baby {animal} is called {an(baby)} {baby}."),
            ([f"Tell me about {plural}.", f"Tell me something about {plural}."],
             " ".join(animal_facts(rng, animal)[:4]))]
    if sound:
        asks.append(([f"What sound does {a} make?", f"What does {a} say?"], f"{A} says \"{sound}\"."))
    questions, answer = rng.choice(asks)
    right = [sentence for phrasings in animal_fact_phrasings(animal) for sentence in phrasings] \
        if questions[0].startswith("Tell me") else [answer]  # about lions: any true lion facts
    return [("user", rng.choice(questions)), ("assistant", answer)], dict(type="fact", replies=right)


def task_world(rng):
    kind = rng.randrange(5)
    if kind == 0:
        job = rng.choice(list(JOBS))
        does, where, uses = JOBS[job]
        q, ans = rng.choice([(f"What does {an(job)} {job} do?", f"{cap(an(job))} {job} {does}."),
                             (f"Where does {an(job)} {job} work?", f"{cap(an(job))} {job} works {where}."),
                             (f"What does {an(job)} {job} use at work?", f"{cap(an(job))} {job} uses {uses}.")])
    elif kind == 1:
        thing = rng.choice(list(COLOR_OF))
        q, ans = f"What color is {thing}?", f"{cap(thing)} is {COLOR_OF[thing]}."
    elif kind == 2:
        x, y = rng.choice(OPPOSITES)
        x, y = (x, y) if rng.random() < 0.5 else (y, x)
        q, ans = rng.choice([f"What is the opposite of {x}?", f"What is the opposite of \"{x}\"?"]), \
            f"The opposite of {x} is {y}."
    elif kind == 3:
        shape = rng.choice(list(SHAPES))
        q = f"How many sides does {an(shape)} {shape} have?"
        ans = f"{cap(an(shape))} {shape} has {SHAPES[shape]} sides."
    else:
        part = rng.choice(list(BODY))
        q, ans = f"What do we use our {part} for?", f"We use our {part} to {BODY[part]}."
    return [("user", q), ("assistant", ans)], dict(type="fact", replies=[ans])


def arithmetic(rng):
    """(question, its right replies, result) for one small sum, difference or product."""
    op = rng.choice("+-*")
    if op == "+":
        x, y = rng.randint(1, 50), rng.randint(1, 49)
        z = x + y
        q = rng.choice([f"What is {x} + {y}?", f"What is {x} plus {y}?", f"Can you add {x} and {y}?",
                        f"How much is {x} + {y}?"])
    elif op == "-":
        x = rng.randint(2, 99)
        y = rng.randint(1, x)
        z = x - y
        q = rng.choice([f"What is {x} - {y}?", f"What is {x} minus {y}?", f"Take {y} away from {x}. What is left?"])
    else:
        x, y = rng.randint(1, 10), rng.randint(1, 10)
        z = x * y
        q = rng.choice([f"What is {x} * {y}?", f"What is {x} times {y}?", f"How much is {x} times {y}?"])
    return q, [f"{x} {op} {y} = {z}.", f"The answer is {z}, because {x} {op} {y} = {z}.", f"{x} {op} {y} = {z}"], z


def task_math(rng):
    q, replies, z = arithmetic(rng)
    turns = [("user", q), ("assistant", rng.choice(replies))]
    if rng.random() < 0.3:  # a follow-up that needs the previous answer
        y = rng.randint(1, 20)
        if rng.random() < 0.5 or z < y:
            q, replies = rng.choice([f"Now add {y} to that.", f"And if I add {y} more?"]), [f"{z} + {y} = {z + y}."]
        else:
            q, replies = rng.choice([f"Now take away {y}.", f"And if I take {y} away?"]), [f"{z} - {y} = {z - y}."]
        turns += [("user", q), ("assistant", replies[0])]
    return turns, dict(type="math", replies=replies)


def task_numbers(rng):
    kind = rng.randrange(4)
    if kind == 0:
        x, y = rng.sample(range(1, 100), 2)
        q = rng.choice([f"Which is bigger, {x} or {y}?", f"Which number is larger: {x} or {y}?"])
        ans = f"{max(x, y)} is bigger than {min(x, y)}."
    elif kind == 1:
        n = rng.randint(1, 50)
        q, ans = f"Is {n} even or odd?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."
    elif kind == 2:
        start = rng.randint(1, 30)
        end = start + rng.randint(3, 9)
        q, ans = f"Count from {start} to {end}.", ", ".join(str(i) for i in range(start, end + 1)) + "."
    else:
        n = rng.randint(1, 98)
        q, ans = rng.choice([(f"What number comes after {n}?", f"{n + 1} comes after {n}."),
                             (f"What number comes before {n + 1}?", f"{n} comes before {n + 1}.")])
    return [("user", q), ("assistant", ans)], dict(type="numbers", replies=[ans])


def task_word(rng):
    word = rng.choice(SPELL_WORDS)
    kind = rng.randrange(5)
    if kind == 0:
        q, ans = rng.choice([f"How do you spell \"{word}\"?", f"Spell the word {word}."]), \
            f"\"{word}\" is spelled {'-'.join(word)}."
    elif kind == 1:
        q, ans = f"How many letters are in the word \"{word}\"?", f"The word \"{word}\" has {len(word)} letters."
    elif kind == 2:
        q, ans = f"What is the first letter of \"{word}\"?", f"The first letter of \"{word}\" is \"{word[0]}\"."
    elif kind == 3:
        q, ans = f"What is the last letter of \"{word}\"?", f"The last letter of \"{word}\" is \"{word[-1]}\"."
    else:
        q, ans = f"Write \"{word}\" backwards.", f"\"{word}\" backwards is \"{word[::-1]}\"."
    return [("user", q), ("assistant", ans)], dict(type="word", replies=[ans])


SENTENCE_VERBS = ["found", "painted", "carried", "dropped", "washed", "bought", "saw", "hid", "fixed", "shared",
                  "lost", "gave away", "cleaned", "opened"]


def simple_sentence(rng):
    """A short sentence and one word in it with a sensible replacement (a name, a color or a thing)."""
    name, color, noun = make_character(rng).name, rng.choice(COLORS), rng.choice(THINGS)
    s = f"{name} {rng.choice(SENTENCE_VERBS)} {an(color)} {color} {noun} {Place(*rng.choice(PLACES)).at}."
    swap = rng.choice([(name, make_character(rng, avoid={name}).name),
                       (color, rng.choice([c for c in COLORS if c != color])),
                       (noun, rng.choice([t for t in THINGS if t != noun]))])
    return s, swap


def task_rewrite(rng):
    s, (old, new) = simple_sentence(rng)
    kind = rng.randrange(5)
    if kind == 0:
        q, ans = f"Write this in capital letters: {s}", s.upper()
    elif kind == 1:
        words = rng.sample(rng.choice(list(CATEGORIES.values())), rng.randint(3, 5))
        q, ans = f"Put these words in alphabetical order: {', '.join(words)}", ", ".join(sorted(words))
    elif kind == 2:
        q, ans = f"How many words are in this sentence? {s}", f"There are {len(s.split())} words."
    elif kind == 3:
        new_s = re.sub(rf"\b{re.escape(old)}\b", new, s, count=1)
        new_s = re.sub(r"\ba (?=[aeiou])", "an ", re.sub(r"\ban (?=[^aeiou])", "a ", new_s))  # a/an may change
        q, ans = f"Replace \"{old}\" with \"{new}\" in this sentence: {s}", new_s
    else:
        q, ans = f"Fix the capital letter and add the full stop: {s[:-1].lower()}", s
    return [("user", q), ("assistant", ans)], dict(type="rewrite", replies=[ans])


def task_story(rng):
    """A story asked for (right when it names whom and where it was asked about), sometimes with a question
    about it after (a story question: the model must read its own story back)."""
    text, about, qa, asked = english_story(rng)
    turns = [("user", rng.choice([f"Tell me a short story about {about}.", f"Write a story about {about}.",
                                  f"Can you tell me a story about {about}?"])), ("assistant", text)]
    if rng.random() < 0.5:
        q, ans = rng.choice(qa)
        return turns + [("user", q), ("assistant", ans)], dict(type="story question", replies=[ans])
    return turns, dict(type="story", mentions=asked)


def task_reading(rng):
    text, _, qa, _ = english_story(rng)
    q, ans = rng.choice(qa)
    return [("user", f"Read the story and answer the question.\n\n{text}\n\nQuestion: {q}"), ("assistant", ans)], \
        dict(type="reading", replies=[ans])


SFT_TASKS = [(task_small_talk, 10), (task_animal, 24), (task_world, 16), (task_math, 6), (task_numbers, 4),
             (task_word, 6), (task_rewrite, 4), (task_story, 12), (task_reading, 4)]
SFT_MAX_CHARS = 850  # keeps nearly every chat within 256 tokens (the cpu preset's seq_len), 4096-piece tokenizer


def chat_record(turns, check) -> dict:
    """A chat as the files hold it: every reply after an empty think block, and how its last one is scored."""
    return {"conversations": [{"role": r, "content": think_reply("", c) if r == "assistant" else c}
                              for r, c in turns], **check}


def english_chat(rng) -> dict:
    while True:
        turns = [("system", rng.choice(SYSTEM_PROMPTS))] if rng.random() < 0.3 else []
        if rng.random() < 0.1:
            turns += exchange(rng, SMALL_TALK[0])[0]
        tasks, weights = zip(*SFT_TASKS)
        for task in rng.choices(tasks, weights, k=rng.choices([1, 2, 3], [75, 20, 5])[0]):
            more, check = task(rng)
            turns += more
        if rng.random() < 0.1:
            more, check = exchange(rng, rng.choice([THANKS, BYE]))
            turns += more
        if sum(len(c) for _, c in turns) <= SFT_MAX_CHARS:
            return chat_record(turns, check)


# Reasoning problems (r1): each returns (question, worked steps, final reply, answer); every sum in the steps
# is written "x op y = z" so it can be checked, and the answer is the result of the last one (or a count).
# Each draws all its numbers first, then works the answer through a Work: right for r1 and the chosen reply
# of a preference pair, with one mistake for the rejected reply of the same problem.

R1_SYSTEM_PROMPTS = ["You are a helpful assistant. Think step by step before you answer.",
                     "You are a careful assistant. First think inside <think> and </think>, then give the answer.",
                     "Solve the problem. Show your thinking, then give a short final answer."]
GAIN = ["buys {k} more", "finds {k} more", "gets {k} more from {b.name}", "picks {k} more"]
LOSE = ["gives {k} to {b.name}", "loses {k}", "gives {k} away", "sells {k}"]
OPERATIONS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: x // y}
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
MISTAKES = {"slip": 3, "operation": 2, "miscount": 3, "copied": 1}  # how often each is made, where it can be


class Term(int):
    """A number that remembers the arithmetic it came from ("4 + 2 * 3"), for a call to the calculator."""

    def __new__(cls, value: int, expression: str = "", precedence: int = 3):
        term = super().__new__(cls, value)
        term.expression, term.precedence = expression or str(value), precedence
        return term


def operand(x, op: str, right: bool) -> str:
    """x written as an operand of op, in parentheses where the order of operations needs them."""
    term = x if isinstance(x, Term) else Term(x)
    needed = term.precedence < PRECEDENCE[op] or (right and term.precedence == PRECEDENCE[op] and op in "-/")
    return f"({term.expression})" if needed else term.expression


class Work:
    """The sums, counts and final answer of one worked reply: all right (Work()), or with one mistake that
    every later step carries on, as in a small model's wrong answer.

    eq(x, op, y) -> ("x op y = z", z): an equation, and its result for the next step (a Term: `last` is the
    latest, whose expression is the whole problem's arithmetic where the answer is the last result). With
    results=False the equation is only set up, as the arithmetic so far ("2 - 1 + 4"), for the calculator to work;
    judge(fact) -> whether one item of a count is counted; answer(n) -> the final answer. The mistakes: "slip", a
    wrong result in equation `at` (a unit off, a lost carry, the next times-table entry); "operation", the other
    operation in equation `at` (a loss added, groups added up); "miscount", judgement `at` the wrong way (a letter
    missed, a word put in the wrong group); "copied", the question's number `at` (of `numbers`) given as the
    answer."""

    def __init__(self, mistake=None, at=0, rng=None, numbers=(), results=True):
        self.mistake, self.at, self.rng, self.numbers, self.results = mistake, at, rng, numbers, results
        self.equations = self.judgements = 0
        self.last = None

    def eq(self, x: int, op: str, y: int):
        mistaken = self.equations == self.at
        self.equations += 1
        if mistaken and self.mistake == "operation":
            swapped = {"+": "-", "-": "+", "*": "+"}.get(op, op)
            op = swapped if OPERATIONS[swapped](x, y) >= 0 else op
        z = OPERATIONS[op](x, y)
        if mistaken and self.mistake == "slip":
            if op == "*":
                slips = [x, -x, y, -y]  # the next or the previous times-table entry
            else:  # a unit off, or a carry (a borrow) forgotten where there was one
                slips = [1, -1] + ([-10] if op == "+" and x % 10 + y % 10 >= 10 else
                                   [10] if op == "-" and x % 10 < y % 10 else [])
            z += self.rng.choice([d for d in slips if z + d >= 0])
        # the result remembers its expression: the last one is the whole problem as one call to the calculator
        self.last = Term(z, f"{operand(x, op, False)} {op} {operand(y, op, True)}", PRECEDENCE[op])
        return (f"{x} {op} {y} = {z}" if self.results else self.last.expression), self.last

    def judge(self, fact: bool) -> bool:
        mistaken = self.mistake == "miscount" and self.judgements == self.at
        self.judgements += 1
        return fact != mistaken

    def answer(self, n: int) -> int:
        return self.numbers[self.at] if self.mistake == "copied" else n


def r1_change(rng, work):
    a, item = make_character(rng), rng.choice(COLLECT)
    b = make_character(rng, avoid={a.name})
    n = start = rng.randint(2, 10)
    moves = []
    for _ in range(rng.choice([1, 2, 2, 3])):
        if n < 2 or rng.random() < 0.55:
            k = rng.randint(1, 9)
            moves.append((rng.choice(GAIN).format(k=k, b=b), "+", k))
            n += k
        else:
            k = rng.randint(1, n - 1)
            moves.append((rng.choice(LOSE).format(k=k, b=b), "-", k))
            n -= k
    clauses = ', then '.join(clause for clause, _, _ in moves)
    told = f"{a.name} has {count(start, item)} and {clauses}." if rng.random() < 0.5 else \
        f"{a.name} has {count(start, item)}. {a.He} {clauses}."
    question = f"{told} How many {item[1]} does {rng.choice([a.name, a.he])} have now?"
    steps, n = [f"{a.name} starts with {count(start, item)}."], start
    for clause, op, k in moves:
        equation, n = work.eq(n, op, k)
        steps.append(f"{a.He} {clause}: {equation}.")
    n = work.answer(n)
    return question, steps + [f"So {a.name} has {count(n, item)} now."], f"{a.name} has {count(n, item)} now.", n


def r1_groups(rng, work):
    box, item = rng.choice(CONTAINERS), rng.choice(COLLECT)
    g, k = rng.randint(2, 6), rng.randint(2, 6)
    question = f"There are {count(g, box)} with {count(k, item)} in each. How many {item[1]} are there in all?"
    product, total = work.eq(g, "*", k)
    steps = [f"There are {g} {box[1]}, and each {box[0]} has {count(k, item)}.", f"{g} groups of {k} is {product}."]
    if g * k <= 90 and rng.random() < 0.4:
        extra = rng.randint(1, 9)
        question = question.replace(" How many", f" There are also {extra} loose {item[1]} on the table. How many")
        addition, total = work.eq(total, "+", extra)
        steps.append(f"Adding the {extra} loose ones: {addition}.")
    total = work.answer(total)
    return question, steps + [f"So there are {count(total, item)} in all."], \
        f"There are {count(total, item)} in all.", total


def r1_share(rng, work):
    a, item = make_character(rng), rng.choice(COLLECT)
    k, each = rng.randint(2, 6), rng.randint(1, 6)
    total = k * each
    question = f"{a.name} has {count(total, item)} and shares them equally among {k} friends. " \
               f"How many {item[1]} does each friend get?"
    division, each = work.eq(total, "/", k)
    steps = [f"{total} {item[1]} shared by {k} friends means {total} / {k}.",
             f"{k} * {each} = {total}, so each friend gets {each}.", f"{division}."]
    each = work.answer(each)
    return question, steps, f"Each friend gets {count(each, item)}.", each


def r1_compare(rng, work):
    a, item = make_character(rng), rng.choice(COLLECT)
    b = make_character(rng, avoid={a.name})
    x, y = sorted(rng.sample(range(1, 31), 2))
    if rng.random() < 0.5:
        question = f"{a.name} has {count(x, item)}. {b.name} has {count(y, item)}. " \
                   f"How many more {item[1]} does {b.name} have than {a.name}?"
        subtraction, more = work.eq(y, "-", x)
        more = work.answer(more)
        steps = [f"{b.name} has {y} and {a.name} has {x}.", f"The difference is {subtraction}."]
        # the answer last: after it, a small model that cannot copy the name writes a number in its place
        return question, steps, f"{b.name} has {more} more {item[1]}.", more
    k = rng.randint(1, 9)
    question = f"{a.name} has {count(x, item)}. {b.name} has {k} more than {a.name}. " \
               f"How many {item[1]} do they have together?"
    addition, b_has = work.eq(x, "+", k)
    together, total = work.eq(x, "+", b_has)
    total = work.answer(total)
    steps = [f"{b.name} has {k} more than {x}: {addition}.", f"Together: {together}."]
    return question, steps, f"Together they have {count(total, item)}.", total


def r1_age(rng, work):
    a = make_character(rng)
    b = make_character(rng, avoid={a.name})
    x, k, m = rng.randint(3, 12), rng.randint(1, 9), rng.randint(1, 9)
    question = f"{a.name} is {x} years old. {b.name} is {k} years older than {a.name}. " \
               f"How old will {b.name} be in {m} years?"
    older, age = work.eq(x, "+", k)
    later, age = work.eq(age, "+", m)
    age = work.answer(age)
    steps = [f"{b.name} is {k} years older than {a.name}: {older}.", f"In {m} years: {later}."]
    return question, steps, f"{b.name} will be {age} years old.", age


def r1_shop(rng, work):
    a = make_character(rng)
    (i1, i2), (n1, n2) = rng.sample(SHOP_ITEMS, 2), (rng.randint(1, 3), rng.randint(1, 3))
    p1, p2 = rng.randint(1, 6), rng.randint(1, 6)
    total = n1 * p1 + n2 * p2
    question = f"{cap(an(i1[0]))} {i1[0]} costs {count(p1, COIN)} and {an(i2[0])} {i2[0]} costs " \
               f"{count(p2, COIN)}. {a.name} buys {count(n1, i1)} and {count(n2, i2)}. " \
               f"How many coins does {a.name} pay?"
    (first, cost1), (second, cost2) = work.eq(n1, "*", p1), work.eq(n2, "*", p2)
    together, cost = work.eq(cost1, "+", cost2)
    steps = [f"{count(n1, i1)}: {first} coins.", f"{count(n2, i2)}: {second} coins.", f"Together: {together}."]
    if total < 99 and rng.random() < 0.4:
        paid = rng.randint(total + 1, total + 9)
        question = question.replace("How many coins does", f"{a.He} pays with {paid} coins. How much change does")
        question = question.replace(f"{a.name} pay?", f"{a.name} get back?")
        subtraction, change = work.eq(paid, "-", cost)
        change = work.answer(change)
        return question, steps + [f"Change: {subtraction}."], f"{a.name} gets {change} coins back.", change
    cost = work.answer(cost)
    return question, steps, f"{a.name} pays {cost} coins.", cost


def r1_legs(rng, work):
    x, y = rng.sample(FARM_ANIMALS, 2)
    nx, ny = rng.randint(1, 6), rng.randint(1, 6)
    lx, ly = ANIMALS[x][2], ANIMALS[y][2]
    px, py = (ANIMALS[x][0] if nx > 1 else x), (ANIMALS[y][0] if ny > 1 else y)
    question = f"On a farm there {'are' if nx > 1 else 'is'} {nx} {px} and {ny} {py}. How many legs are there in all?"
    (x_times, x_legs), (y_times, y_legs) = work.eq(nx, "*", lx), work.eq(ny, "*", ly)
    together, legs = work.eq(x_legs, "+", y_legs)
    legs = work.answer(legs)
    steps = [f"Each {x} has {lx} legs: {x_times}.", f"Each {y} has {ly} legs: {y_times}.", f"All together: {together}."]
    return question, steps, f"There are {legs} legs in all.", legs


def r1_sum(rng, work):
    numbers = [rng.randint(1, 9) for _ in range(rng.randint(3, 4))]
    while sum(numbers) > 99:
        numbers.pop()
    steps, total = [], numbers[0]
    for n in numbers[1:]:
        addition, total = work.eq(total, "+", n)
        steps.append(f"{addition}.")
    total = work.answer(total)
    question = rng.choice([f"What is {' + '.join(map(str, numbers))}?", f"Work out {' + '.join(map(str, numbers))}.",
                           f"Add these numbers: {', '.join(map(str, numbers))}."])
    if not work.results:  # set up for the calculator: the whole sum in one line
        return question, [f"I add the numbers: {steps[-1]}"], f"The sum is {total}.", total
    return question, ["I add the numbers one at a time."] + steps, f"The sum is {total}.", total


def r1_letter(rng, work):
    word = rng.choice(SPELL_WORDS)
    absent = [c for c in "abcdefghijklmnoprstuwy" if c not in word]
    letter = rng.choice(word) if rng.random() < 0.85 else rng.choice(absent)
    marks, n = [], 0
    for c in word:
        counted = c == letter and work.judge(True)  # a miscount misses one
        n += counted
        marks.append(f"{c} ({n})" if counted else c)
    question = rng.choice([f"How many times does the letter \"{letter}\" appear in the word \"{word}\"?",
                           f"Count the letter \"{letter}\" in \"{word}\"."])
    steps = [f"I spell \"{word}\" and count each \"{letter}\": {', '.join(marks)}.",
             f"So the letter \"{letter}\" appears {n} {'time' if n == 1 else 'times'}."]
    return question, steps, f"The letter \"{letter}\" appears {n} {'time' if n == 1 else 'times'} in \"{word}\".", n


def r1_length(rng, work):
    word = rng.choice(SPELL_WORDS)
    question = rng.choice([f"How many letters are in the word \"{word}\"?", f"How long is the word \"{word}\"?"])
    letters = [c for c in word if work.judge(True)]  # a miscount skips one
    steps = [f"I count the letters of \"{word}\": {', '.join(f'{c} ({i})' for i, c in enumerate(letters, 1))}.",
             f"The last count is {len(letters)}."]
    return question, steps, f"The word \"{word}\" has {len(letters)} letters.", len(letters)


def r1_category(rng, work):
    category = rng.choice(list(CATEGORIES))
    members = rng.sample(CATEGORIES[category], rng.randint(1, 5))
    others = rng.sample([w for c, ws in CATEGORIES.items() if c != category for w in ws], rng.randint(1, 4))
    words = members + others
    rng.shuffle(words)
    kind, plural = category, category + "s"
    steps, n = [], 0
    for w in words:
        if work.judge(w in members):
            n += 1
            steps.append(f"{w}: {an(kind)} {kind} ({n})")
        else:
            steps.append(f"{w}: not {an(kind)} {kind}")
    question = f"How many {plural} are in this list: {', '.join(words)}?"
    return question, steps + [f"So there {'is' if n == 1 else 'are'} {n}."], \
        f"There {'is' if n == 1 else 'are'} {n} {kind if n == 1 else plural} in the list.", n


R1_PROBLEMS = [(r1_change, 20), (r1_groups, 10), (r1_share, 6), (r1_compare, 10), (r1_age, 6), (r1_shop, 8),
               (r1_legs, 8), (r1_sum, 8), (r1_letter, 10), (r1_length, 6), (r1_category, 8)]


def english_reasoning(rng, work=None) -> dict:
    """A reasoning problem worked by `work` (right when None): an r1 record."""
    problems, weights = zip(*R1_PROBLEMS)
    problem = rng.choices(problems, weights)[0]
    question, steps, reply, answer = problem(rng, work or Work())
    turns = [{"role": "system", "content": rng.choice(R1_SYSTEM_PROMPTS)}] if rng.random() < 0.25 else []
    turns += [{"role": "user", "content": question},
              {"role": "assistant", "content": think_reply("\n".join(steps), reply)}]
    return {"conversations": turns, "answer": str(answer), "type": problem.__name__.removeprefix("r1_")}


# Tool use: an arithmetic problem set up in the think block, solved by calling the calculator with its whole
# arithmetic, and answered with the result. A tiny model miscopies numbers in the sums it works itself, and it copies
# a number best from words next to it: the set-up lines copy each number beside its words, as the worked steps do,
# and the call copies the whole expression from the line just above it.
CALCULATOR = tool_spec(calculator)
ARITHMETIC_TYPES = {"change", "groups", "share", "compare", "age", "shop", "legs", "sum"}  # the calculator's job
TOOL_SHARE = 0.3  # of the problems in r1.jsonl: asked with the calculator offered
TOOL_CHAT_SHARE = 0.3  # of the chats with no number in them: the calculator offered, and rightly not called
TOOL_CHAT_MAX_CHARS = 600  # such a chat with the tool list stays within the cpu preset's 256 tokens (stories too)


def with_calculator(problem: dict, work: "Work") -> dict:
    """A problem record (english_reasoning / zh_reasoning, worked by `work`, a Work(results=False)) asked with the
    calculator offered. An arithmetic one's think block keeps the worked steps up to the one that sets up the whole
    arithmetic (work.last, whose result is the answer; the steps after it would need the result), then calls the
    calculator with it and, after the result, gives the worked reply's final answer. A count of letters or words is
    worked in its think block as before (the calculator cannot count them)."""
    if problem["type"] not in ARITHMETIC_TYPES:
        return {**problem, "tools": [CALCULATOR]}
    *asked, worked = problem["conversations"]
    expression = work.last.expression
    assert calculator(expression) == problem["answer"] == str(work.last), expression
    reasoning, reply = worked["content"].removeprefix("<think>\n").split("\n</think>\n")
    steps = reasoning.split("\n")
    set_up = next(i for i, step in enumerate(steps) if expression in step)
    think = "\n".join(steps[:set_up + 1])
    call = {"name": "calculator", "arguments": {"expression": expression}}
    turns = asked + [{"role": "assistant", "content": f"<think>\n{think}\n</think>\n", "tool_calls": [call]},
                     {"role": "tool", "content": problem["answer"]},
                     {"role": "assistant", "content": think_reply("", reply)}]
    return {**problem, "conversations": turns, "tools": [CALCULATOR]}


def offered_calculator(rng, chat: dict) -> dict:
    """A chat, TOOL_CHAT_SHARE of the time with the calculator offered when nothing in it is a number: the model
    learns that a tool in the list is not a reason to call it."""
    text = "".join(turn["content"] for turn in chat["conversations"])
    if len(text) > TOOL_CHAT_MAX_CHARS or any(c.isdigit() for c in text) or rng.random() >= TOOL_CHAT_SHARE:
        return chat
    return {**chat, "tools": [CALCULATOR]}


# ----------------------------------------------------------------------------------------------------------------
# Chinese: the same kinds of data as templated Chinese, with a smaller world

ZH_KIDS = [("小明", "他"), ("小红", "她"), ("小兰", "她"), ("小刚", "他"), ("小华", "他"), ("丽丽", "她"), ("明明", "他"),
           ("芳芳", "她"), ("东东", "他"), ("小雨", "她"), ("小雪", "她"), ("小军", "他"), ("乐乐", "他"), ("甜甜", "她"),
           ("小宇", "他"), ("安安", "她"), ("天天", "他"), ("欢欢", "她")]
ZH_PETS = ["咪咪", "豆豆", "球球", "毛毛", "点点", "花花", "贝贝", "圆圆"]
ZH_HERO_ANIMALS = ["小猫", "小狗", "小兔子", "小熊", "小松鼠", "小狐狸", "小鸭子", "小猴子"]
ZH_TRAITS = ["可爱", "勇敢", "聪明", "善良", "害羞", "快乐", "调皮", "细心", "活泼", "安静"]
ZH_GOOD, ZH_BAD = ["开心", "高兴", "快乐"], ["难过", "伤心", "着急"]
ZH_PLACES = ["公园", "森林", "河边", "学校", "花园", "海边", "农场", "小山上", "图书馆", "池塘边", "草地上", "动物园"]
ZH_TIMES = ["一天早上", "一个晴朗的下午", "一个下雨天", "一个冬天的早晨", "一个夏天的傍晚", "星期天", "一个刮风的日子"]
ZH_THINGS = [("个", "皮球"), ("只", "风筝"), ("本", "故事书"), ("顶", "帽子"), ("把", "雨伞"), ("把", "钥匙"),
             ("个", "布娃娃"), ("支", "铅笔"), ("张", "地图"), ("个", "盒子"), ("条", "围巾"), ("辆", "玩具车"),
             ("个", "机器人"), ("个", "气球"), ("个", "铃铛"), ("个", "书包")]
ZH_COLORS = ["红色", "蓝色", "黄色", "绿色", "白色", "紫色", "粉色", "黑色", "橙色"]
ZH_SPOTS = ["床底下", "门后面", "草丛里", "桌子下面", "沙发后面", "书包里", "大树旁边", "花盆里", "枕头下面", "箱子里"]
ZH_RELATIVES = ["妈妈", "爸爸", "奶奶", "爷爷", "姐姐", "哥哥"]
ZH_SIGHTS = ["一棵开满花的大树", "一条清清的小河", "一群排队走路的小鸭子", "一道美丽的彩虹", "一只在花丛中飞的蝴蝶",
             "几个在放风筝的小朋友", "一只抱着松果的小松鼠", "一片金黄的麦田", "一座红色的小桥", "一位在钓鱼的老爷爷"]
ZH_COUNTABLES = [("个", "苹果"), ("个", "梨"), ("根", "香蕉"), ("颗", "糖"), ("支", "铅笔"), ("本", "书"), ("个", "气球"),
                 ("个", "贝壳"), ("个", "鸡蛋"), ("块", "饼干"), ("朵", "花"), ("张", "贴纸"), ("颗", "弹珠"), ("片", "树叶")]
ZH_BOXES = ["盒子", "袋子", "篮子", "盘子", "罐子"]
ZH_WISHES = [  # (what, obstacle, fix, success)
    ("放风筝", "一点风也没有", "在小山上等到起风", "风筝高高地飞上了天"),
    ("学游泳", "水太深了，{ta}有点害怕", "先抓着池边练习踢腿", "{ta}一口气游到了对岸"),
    ("画一幅大海的画", "颜色混在一起变脏了", "每换一种颜色就把笔洗干净", "画上有蓝蓝的海和白白的船"),
    ("种一盆花", "种子很久都没有发芽", "每天给它浇水、晒太阳", "盆里开出了一朵小红花"),
    ("学骑自行车", "{ta}总是摔倒", "请爸爸在后面扶着车", "{ta}自己骑完了整条小路"),
    ("做一个蛋糕", "第一次做的蛋糕塌了", "又仔细看了一遍做法，再试了一次", "香喷喷的蛋糕做好了"),
    ("搭一座积木城堡", "城堡总是倒下来", "把大积木放在下面，小积木放在上面", "一座高高的城堡搭好了"),
]
ZH_NEEDS = [("我迷路了，找不到家了", "迷路了", "把{animal}送回了家"),
            ("我好饿，一天都没吃东西了", "饿了", "把自己的面包分给了{animal}"),
            ("我被雨淋湿了，好冷", "被雨淋湿了", "用毛巾把{animal}擦干"),
            ("我没有朋友一起玩", "没有朋友一起玩", "陪{animal}玩了一下午"),
            ("我的腿受伤了", "腿受伤了", "给{animal}包好了伤口")]
ZH_FRIEND_ANIMALS = ["小兔子", "小鸭子", "小松鼠", "小狐狸", "小刺猬", "小鸟", "小乌龟", "小鹿"]
ZH_ANIMALS = {  # name: (measure word, sound or None, legs or None, home, food, one more fact)
    "小猫": ("只", "喵喵", 4, "家里", "鱼", "喜欢在太阳下睡觉"), "小狗": ("只", "汪汪", 4, "家里", "骨头和肉", "喜欢跑来跑去"),
    "奶牛": ("头", "哞哞", 4, "农场里", "草", "能给我们牛奶"), "小羊": ("只", "咩咩", 4, "农场里", "草", "身上有软软的羊毛"),
    "鸭子": ("只", "嘎嘎", 2, "池塘边", "小鱼和小虫", "会游泳"), "母鸡": ("只", "咯咯", 2, "农场里", "米和虫子", "会下蛋"),
    "青蛙": ("只", "呱呱", 4, "池塘里", "虫子", "跳得很远"), "小猪": ("头", "哼哼", 4, "农场里", "各种食物", "喜欢在泥里打滚"),
    "马": ("匹", None, 4, "农场里", "草", "跑得很快"), "小鸟": ("只", "叽叽喳喳", 2, "树上的鸟窝里", "虫子和种子", "会飞"),
    "蜜蜂": ("只", "嗡嗡", 6, "蜂巢里", "花蜜", "会酿蜂蜜"), "蜘蛛": ("只", None, 8, "网上", "小虫子", "会织网"),
    "兔子": ("只", None, 4, "洞里", "胡萝卜和青草", "有长长的耳朵"), "鱼": ("条", None, 0, "水里", "水草和小虫", "用鳃呼吸"),
    "熊猫": ("只", None, 4, "竹林里", "竹子", "是中国的国宝"), "猴子": ("只", None, None, "树上", "香蕉和水果", "很会爬树"),
}
ZH_FARM = ["奶牛", "小羊", "鸭子", "母鸡", "小猪", "马"]
ZH_COLOR_OF = {"天空": "蓝色", "草": "绿色", "雪": "白色", "香蕉": "黄色", "草莓": "红色", "胡萝卜": "橙色", "葡萄": "紫色",
               "乌鸦": "黑色", "牛奶": "白色", "西瓜的瓤": "红色", "树叶": "绿色", "柠檬": "黄色"}
ZH_SEASONS = {"春天": ["天气变暖了", "花儿开了", "小草发芽了"], "夏天": ["天气很热", "人们喜欢去游泳", "白天很长"],
              "秋天": ["树叶变黄了", "果子成熟了", "天气变凉了"], "冬天": ["天气很冷", "有时会下雪", "人们穿上厚厚的衣服"]}
ZH_CATEGORIES = {"动物": ["小猫", "小狗", "老虎", "兔子", "熊猫", "猴子", "大象", "狮子"],
                 "水果": ["苹果", "香蕉", "葡萄", "西瓜", "橘子", "桃子", "草莓"],
                 "颜色": ["红色", "蓝色", "黄色", "绿色", "白色", "紫色"]}
ZH_TYPES = ["change", "groups", "compare", "legs", "category"]  # zh_reasoning's kinds, as the English types
ZH_DAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期天"]


def zh_character(rng, avoid=()):
    """(name, 他/她, how the story introduces them)."""
    trait = rng.choice(ZH_TRAITS)
    if rng.random() < 0.7:
        name, ta = rng.choice([k for k in ZH_KIDS if k[0] not in avoid])
        return name, ta, f"一个{trait}的{'小女孩' if ta == '她' else '小男孩'}"
    name = rng.choice([n for n in ZH_PETS if n not in avoid])
    return name, rng.choice("他她"), f"一只{trait}的{rng.choice(ZH_HERO_ANIMALS)}"


def zh_story(rng):
    """(text, what it is about, [(question, answer)], [the name and place `about` asks for]) for one Chinese story."""
    name, ta, desc = zh_character(rng)
    friend = zh_character(rng, avoid={name})[0]
    measure, noun = rng.choice(ZH_THINGS)
    say = Say(rng, name=name, ta=ta, desc=desc, b=friend, noun=noun, thing=f"一{measure}{rng.choice(ZH_COLORS)}的{noun}",
              place=rng.choice(ZH_PLACES), time=rng.choice(ZH_TIMES), good=rng.choice(ZH_GOOD), bad=rng.choice(ZH_BAD),
              rel=rng.choice(ZH_RELATIVES))
    opening = say("从前，有{desc}，名字叫{name}。", "{name}是{desc}。", "在一个小村子里，住着{desc}，叫{name}。")
    arc = rng.randrange(5)
    if arc == 0:
        say.slots.update(zip(("s1", "s2", "s3"), rng.sample(ZH_SPOTS, 3)))
        lines = [say("{ta}有{thing}，{ta}非常喜欢它。", "{rel}送给{ta}{thing}。"),
                 say("{time}，{name}找不到{ta}的{noun}了。", "可是有一天，{noun}不见了！"),
                 say("{ta}很{bad}。", "{name}急得快要哭了。"), say("{ta}先在{s1}找，可是没有。"),
                 say("又在{s2}找，还是没有。"), say("这时，{b}走过来问：“你怎么了？”"),
                 say("“我的{noun}不见了。”{name}说。"), say("“别着急，我来帮你找。”{b}说。"),
                 say("他们一起找，最后在{s3}找到了{noun}。"), say("{name}高兴地说：“谢谢你，{b}！”"),
                 say("从那以后，{name}总是把{noun}放在安全的地方。", "{name}明白了，好朋友会一起想办法。")]
        about, qa = "{name}丢了{noun}", [("{name}丢了什么？", "{name}丢了{ta}的{noun}。"), ("谁帮了{name}？", "{b}帮{name}一起找。"),
                                      ("{noun}最后在哪里找到的？", "{noun}最后在{s3}找到了。")]
    elif arc == 1:
        what, obstacle, fix, success = rng.choice(ZH_WISHES)
        say.slots.update(what=what, obstacle=say.fill(obstacle), fix=fix, success=say.fill(success))
        lines = [say("{name}一直想{what}。", "{name}最大的愿望是{what}。"), say("{time}，{ta}决定试一试。"),
                 say("可是{obstacle}。", "但是，{obstacle}。"), say("{name}有点{bad}，差点就放弃了。"),
                 say("后来，{ta}想了一个办法：{fix}。", "{b}说：“别放弃！”于是{ta}{fix}。"), say("终于，{success}！"),
                 say("{name}{good}极了。", "{name}开心地笑了。"), say("{ta}明白了：只要不放弃，就能做到。", "这真是美好的一天。")]
        about, qa = "{name}想{what}", [("{name}想做什么？", "{name}想{what}。"), ("遇到了什么困难？", "{obstacle}。"),
                                    ("{name}是怎么解决的？", "{ta}{fix}。")]
    elif arc == 2:
        need, problem, fix = rng.choice(ZH_NEEDS)
        say.slots["animal"] = rng.choice(ZH_FRIEND_ANIMALS)
        say.slots.update(need=need, problem=problem, fix=say.fill(fix))
        lines = [say("{time}，{name}在{place}玩。"), say("{ta}看见一只{animal}在哭。", "忽然，{ta}听见一只{animal}在哭。"),
                 say("“你怎么了？”{name}问。"), say("“{need}。”{animal}说。"), say("{name}{fix}。", "于是，{name}{fix}。"),
                 say("{animal}高兴地说：“谢谢你！我们做朋友吧！”"),
                 say("从那天起，{name}和{animal}成了好朋友。", "{name}和{animal}每天都一起玩。")]
        about, qa = "{name}帮助一只{animal}", [("{name}遇见了谁？", "{name}遇见了一只{animal}。"),
                                          ("{animal}怎么了？", "{animal}{problem}。"), ("{name}是怎么帮忙的？", "{name}{fix}。")]
    elif arc == 3:
        m, item = rng.choice(ZH_COUNTABLES)
        start = rng.randrange(len(ZH_DAYS) - 3)
        total = rng.randint(1, 6)
        lines = [say(f"{{name}}喜欢收集{item}。"), say(f"{ZH_DAYS[start]}，{{ta}}找到了{total}{m}{item}。")]
        for day in ZH_DAYS[start + 1:start + rng.randint(2, 4)]:
            k = rng.randint(1, 6)
            lines.append(say(f"{day}，{{ta}}又找到了{k}{m}，{total} + {k} = {total + k}，现在一共有{total + k}{m}了。"))
            total += k
        lines.append(say(f"{{name}}把{item}都放进{rng.choice(ZH_BOXES)}里，数了数，一共{total}{m}！"))
        about = f"{{name}}收集{item}"
        qa = [(f"{{name}}最后一共有几{m}{item}？", f"{{name}}最后一共有{total}{m}{item}。"),
              ("{name}喜欢收集什么？", f"{{name}}喜欢收集{item}。")]
    else:
        say.slots.update(zip(("s1", "s2"), rng.sample(ZH_SIGHTS, 2)))
        lines = [say("{time}，{name}和{rel}一起去{place}。"), say("路上，{ta}看见了{s1}。"),
                 say("后来，{ta}又看见了{s2}。", "走着走着，{ta}又看见了{s2}。"), say("{name}觉得今天真{good}。"),
                 say("回到家，{name}把看到的东西都画了下来。", "晚上，{name}笑着睡着了。")]
        about, qa = "{name}和{rel}去{place}", [("{name}去了哪里？", "{name}和{rel}一起去了{place}。"),
                                           ("{name}先看见了什么？", "{ta}先看见了{s1}。")]
    qa.append(("故事的主人公是谁？", "故事的主人公是{name}，{desc}。"))
    asked = [say.slots[slot] for slot in ("name", "place") if "{" + slot + "}" in about]
    return opening + "".join(lines), say.fill(about), [(say.fill(q), say.fill(a)) for q, a in qa], asked


def zh_facts(rng) -> str:
    topic = rng.randrange(4)
    if topic < 2:
        animal = rng.choice(list(ZH_ANIMALS))
        m, sound, legs, home, food, fact = ZH_ANIMALS[animal]
        facts = [f"{animal}住在{home}。", f"{animal}喜欢吃{food}。", f"{animal}{fact}。"]
        facts += [f"{animal}的叫声是“{sound}”。"] if sound else []
        facts += [f"一{m}{animal}有{legs}条腿。" if legs else f"{animal}没有腿。"] if legs is not None else []
        rng.shuffle(facts)
        return rng.choice([f"你了解{animal}吗？", f"我们来认识一下{animal}。", ""]) + "".join(facts)
    if topic == 2:
        things = rng.sample(list(ZH_COLOR_OF), 4)
        return "我们身边有很多颜色。" + "".join(f"{t}是{ZH_COLOR_OF[t]}的。" for t in things)
    season = rng.choice(list(ZH_SEASONS))
    return f"一年有四个季节：春天、夏天、秋天和冬天。{season}到了，" + "，".join(ZH_SEASONS[season]) + "。"


def zh_dialogue(rng) -> str:
    a, _, _ = zh_character(rng)
    b, _, _ = zh_character(rng, avoid={a})
    if rng.random() < 0.5:
        m, item = rng.choice(ZH_COUNTABLES)
        price, n = rng.randint(1, 9), rng.randint(2, 9)
        return (f"{a}去商店买{item}。“阿姨，一{m}{item}多少钱？”{a}问。“一{m}{item}{price}元。”阿姨说。"
                f"“我要{n}{m}。”阿姨算了算：{n} * {price} = {n * price}。“一共{n * price}元。”{a}付了钱，说：“谢谢阿姨！”")
    chore = rng.choice(["收拾房间", "给花浇水", "喂小猫", "写完作业"])
    game = rng.choice(["捉迷藏", "跳绳", "踢球", "搭积木"])
    return (f"“我们一起玩{game}吧！”{a}说。“好呀！不过我要先{chore}。”{b}说。“我来帮你！”{a}说。"
            f"两个人一起{chore}，很快就做完了。然后，他们高高兴兴地玩起了{game}。")


def zh_quiz(rng) -> str:
    """Questions about the world, each followed by its answer, as english quiz()."""
    return "\n".join("".join(zh_fact_question(rng)) for _ in range(rng.randint(3, 6)))


def zh_worked_problem(rng, avoid=()) -> str:
    """A Chinese reasoning problem as plain text, as worked_problem: the question, one step a line, the answer;
    never one whose question is in `avoid`."""
    while True:
        question, reply = (turn["content"] for turn in zh_reasoning(rng)["conversations"])
        if question not in avoid:
            return question + "\n" + reply.replace("<think>\n", "").replace("\n</think>", "")


ZH_DOCUMENT_MIX = [(lambda rng: zh_story(rng)[0], 45), (zh_dialogue, 10), (zh_facts, 12), (zh_quiz, 13),
                   (zh_worked_problem, 20)]  # shares of the Chinese pretraining documents


def zh_document(rng, avoid=()) -> str:
    makers, weights = zip(*ZH_DOCUMENT_MIX)
    make = rng.choices(makers, weights)[0]
    return make(rng, avoid) if make is zh_worked_problem else make(rng)


ZH_SMALL_TALK = [(["你好！", "你好呀", "嗨！"], ["你好！有什么可以帮你的吗？", "你好！今天想聊点什么？"], "greeting"),
                 (["早上好！"], ["早上好！祝你今天过得愉快。"], "greeting"),
                 (["你是谁？", "你叫什么名字？", "请介绍一下你自己。"],
                  ["我是一个小小的聊天助手，可以回答简单的问题、算数和讲故事。"], "small talk"),
                 (["谢谢你！", "谢谢！"], ["不客气！", "不用谢，很高兴能帮到你。"], "greeting"),
                 (["再见！", "拜拜！"], ["再见！祝你今天开心！"], "greeting"),
                 (["我有点无聊。"], ["要不要听一个小故事？或者我们来做一道算术题吧！"], "small talk")]


def zh_fact_question(rng) -> tuple:
    """(question, answer) about an animal (two in three) or the color of a thing."""
    if rng.random() < 1 / 3:
        thing = rng.choice(list(ZH_COLOR_OF))
        return f"{thing}是什么颜色的？", f"{thing}是{ZH_COLOR_OF[thing]}的。"
    animal = rng.choice(list(ZH_ANIMALS))
    m, sound, legs, home, food, fact = ZH_ANIMALS[animal]
    asks = [(f"{animal}住在哪里？", f"{animal}住在{home}。"), (f"{animal}喜欢吃什么？", f"{animal}喜欢吃{food}。")]
    asks += [(f"{animal}怎么叫？", f"{animal}“{sound}”地叫。")] if sound else []
    asks += [(f"{animal}有几条腿？", f"{animal}有{legs}条腿。" if legs else f"{animal}没有腿。")] if legs is not None else []
    return rng.choice(asks)


def zh_chat(rng) -> dict:
    """One Chinese chat, scored as english_chat's (a fact, a story and a question about it, a sum, ...)."""
    kind = rng.randrange(6)
    if kind == 0:
        turns, check = exchange(rng, rng.choice(ZH_SMALL_TALK))
    elif kind in (1, 2):
        q, ans = zh_fact_question(rng)
        turns, check = [("user", q), ("assistant", ans)], dict(type="fact", replies=[ans])
    elif kind == 3:
        x, y = rng.randint(1, 50), rng.randint(1, 49)
        op, word, z = rng.choice([("+", "加", x + y), ("-", "减", abs(x - y))])
        x, y = (x, y) if op == "+" else (max(x, y), min(x, y))
        ans = f"{x} {op} {y} = {z}，所以{x}{word}{y}等于{z}。"
        turns = [("user", rng.choice([f"{x}{word}{y}等于多少？", f"{x} {op} {y} 等于几？"])), ("assistant", ans)]
        check = dict(type="math", replies=[ans])
    elif kind == 4:
        text, about, qa, asked = zh_story(rng)
        q, ans = rng.choice(qa)
        told = [("user", f"给我讲一个关于{about}的故事。"), ("assistant", text)]
        turns, check = rng.choice([(told, dict(type="story", mentions=asked)),
                                   (told + [("user", q), ("assistant", ans)], dict(type="story question", replies=[ans])),
                                   ([("user", f"读下面的故事，回答问题。\n\n{text}\n\n问题：{q}"), ("assistant", ans)],
                                    dict(type="reading", replies=[ans]))])
    else:
        word = rng.choice([w for ws in ZH_CATEGORIES.values() for w in ws] + ZH_PLACES)
        ans = f"“{word}”有{len(word)}个字。"
        turns, check = [("user", f"“{word}”有几个字？"), ("assistant", ans)], dict(type="word", replies=[ans])
    system = [("system", rng.choice(["你是一个乐于助人的助手。", "你是一个友好的助手，回答要简单清楚。"]))] \
        if rng.random() < 0.3 else []
    return chat_record(system + turns, check)


def zh_reasoning(rng, work=None) -> dict:
    """A reasoning problem worked by `work` (right when None), as english_reasoning."""
    work = work or Work()
    name, ta, _ = zh_character(rng)
    friend = zh_character(rng, avoid={name})[0]
    m, item = rng.choice(ZH_COUNTABLES)
    kind = rng.randrange(5)
    if kind == 0:
        n = start = rng.randint(2, 15)
        moves = []
        for _ in range(rng.randint(2, 3)):
            if n < 2 or rng.random() < 0.55:
                k = rng.randint(1, 12)
                moves.append((rng.choice([f"又买了{k}{m}", f"又捡到了{k}{m}", f"{friend}又送给{ta}{k}{m}"]), "+", k))
                n += k
            else:
                k = rng.randint(1, n - 1)
                moves.append((rng.choice([f"送给{friend}{k}{m}", f"吃掉了{k}{m}" if item in ("苹果", "梨", "香蕉", "糖", "饼干")
                                          else f"弄丢了{k}{m}"]), "-", k))
                n -= k
        question = f"{name}有{start}{m}{item}，{'，然后'.join(clause for clause, _, _ in moves)}。{name}现在有几{m}{item}？"
        steps, n = [f"{name}一开始有{start}{m}{item}。"], start
        for clause, op, k in moves:
            equation, n = work.eq(n, op, k)
            steps.append(f"{clause}：{equation}。")
        answer = work.answer(n)
        reply = f"{name}现在有{answer}{m}{item}。"
    elif kind == 1:
        g, k = rng.randint(2, 9), rng.randint(2, 9)
        box = rng.choice(ZH_BOXES)
        question = f"有{g}个{box}，每个{box}里有{k}{m}{item}。一共有多少{m}{item}？"
        product, total = work.eq(g, "*", k)
        steps = [f"有{g}个{box}，每个里面有{k}{m}。", f"{product}。"]
        answer = work.answer(total)
        reply = f"一共有{answer}{m}{item}。"
    elif kind == 2:
        x, y = sorted(rng.sample(range(1, 50), 2))
        question = f"{name}有{x}{m}{item}，{friend}有{y}{m}{item}。{friend}比{name}多几{m}？"
        subtraction, more = work.eq(y, "-", x)
        steps = [f"{friend}有{y}{m}，{name}有{x}{m}。", f"相差：{subtraction}。"]
        answer = work.answer(more)
        reply = f"{friend}比{name}多{answer}{m}{item}。"
    elif kind == 3:
        x, y = rng.sample(ZH_FARM, 2)
        nx, ny = rng.randint(1, 9), rng.randint(1, 9)
        (mx, _, lx, *_), (my, _, ly, *_) = ZH_ANIMALS[x], ZH_ANIMALS[y]
        question = f"农场里有{nx}{mx}{x}和{ny}{my}{y}。它们一共有几条腿？"
        (x_times, x_legs), (y_times, y_legs) = work.eq(nx, "*", lx), work.eq(ny, "*", ly)
        together, legs = work.eq(x_legs, "+", y_legs)
        steps = [f"每{mx}{x}有{lx}条腿：{x_times}。", f"每{my}{y}有{ly}条腿：{y_times}。", f"合起来：{together}。"]
        answer = work.answer(legs)
        reply = f"它们一共有{answer}条腿。"
    else:
        category = rng.choice(list(ZH_CATEGORIES))
        members = rng.sample(ZH_CATEGORIES[category], rng.randint(1, 4))
        words = members + rng.sample([w for c, ws in ZH_CATEGORIES.items() if c != category for w in ws],
                                     rng.randint(1, 4))
        rng.shuffle(words)
        question = f"下面这些词里，有几个是{category}：{'、'.join(words)}？"
        steps, n = [], 0
        for w in words:
            counted = work.judge(w in members)
            n += counted
            steps.append(f"{w}：是{category}（{n}）" if counted else f"{w}：不是{category}")
        reply, answer = f"一共有{n}个是{category}。", n
    steps.append(f"所以答案是{answer}。")
    turns = [{"role": "user", "content": question},
             {"role": "assistant", "content": think_reply("\n".join(steps), f"{reply}答案是：{answer}。")}]
    return {"conversations": turns, "answer": str(answer), "type": ZH_TYPES[kind]}


# ----------------------------------------------------------------------------------------------------------------
# Writing

EXAMPLE_QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have now?"  # README quickstart
FILE_NAMES = ["pretrain", "pretrain_val", "sft", "sft_val", "r1", "r1_val", "dpo", "dpo_val"]
GENERATORS = {"en": (english_document, english_chat, english_reasoning), "zh": (zh_document, zh_chat, zh_reasoning)}


def documents(rng, make_document, n_bytes: int, avoid=()):
    """Documents until about n_bytes of UTF-8 text (no worked problem asks a question in `avoid`)."""
    size = 0
    while size < n_bytes:
        text = make_document(rng, avoid)
        size += len(text.encode("utf-8"))
        yield {"text": text}


def reasoning_pair(rng, make_problem):
    """A reasoning problem with its right worked reply (chosen, as r1 writes it) and a wrong one (rejected):
    the same problem worked again with one mistake (see Work), carried to a final answer that differs.
    None when no mistake can change the answer (a count of a letter that is not in the word)."""
    draws = rng.getstate()  # the wrong reply works the same problem: the same random draws again
    right_work = Work()
    right = make_problem(rng, right_work)
    *history, chosen = right["conversations"]
    numbers = sorted({int(n) for n in re.findall(r"\d+", history[-1]["content"])} - {int(right["answer"])})
    places = {"slip": right_work.equations, "operation": right_work.equations, "miscount": right_work.judgements,
              "copied": len(numbers)}
    possible = [mistake for mistake in MISTAKES if places[mistake]]
    for _ in range(4 if possible else 0):  # a few tries: some mistakes change nothing (a division has no swap)
        mistake = rng.choices(possible, [MISTAKES[m] for m in possible])[0]
        replay = random.Random()
        replay.setstate(draws)
        wrong = make_problem(replay, Work(mistake, rng.randrange(places[mistake]), rng, numbers))
        rejected = wrong["conversations"][-1]["content"]
        assert wrong["conversations"][:-1] == history  # the draws never depend on how the answer is worked
        if wrong["answer"] != right["answer"] and "= -" not in rejected:  # nobody has -2 apples
            return {"conversations": history, "chosen": chosen["content"], "rejected": rejected,
                    "answer": right["answer"]}
    return None


def problem_or_tool_use(rng, make_problem) -> dict:
    """A reasoning problem; TOOL_SHARE of them asked with the calculator offered (with_calculator)."""
    if rng.random() >= TOOL_SHARE:
        return make_problem(rng, Work())
    work = Work(results=False)
    return with_calculator(make_problem(rng, work), work)


def new_problems(rng, make_record, n: int, seen: set):
    """n records of problems whose questions (the last user turn) are not in `seen`, each added to it, so
    held-out problems stay unseen in training. make_record may give None: nothing from that draw."""
    made = misses = 0
    while made < n:
        record = make_record(rng)
        question = record and [t["content"] for t in record["conversations"] if t["role"] == "user"][-1]
        if question is None or question in seen:
            misses += 1
            if misses > 10_000:
                raise UserError(f"only {len(seen)} different reasoning problems could be made: ask for fewer")
            continue
        seen.add(question)
        made, misses = made + 1, 0
        yield record


def write_jsonl(path: str, records) -> str:
    """Write records to path atomically: an interrupted run never leaves a complete-looking file."""
    with atomic_write(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_offline_data(out_dir: str, lang: str = "en", seed: int = 0, pretrain_mb: float = 3.5, n_sft: int = 4000,
                       n_r1: int = 4000, n_dpo: int = 2000, n_val: int = 300) -> dict:
    """Write the eight built-in files into out_dir; returns {name: path}. Each file has its own random stream
    (seeded by seed and file name), so changing one size leaves the other files as they were."""
    if lang not in GENERATORS:
        raise UserError(f"--lang must be one of {', '.join(GENERATORS)}, got {lang!r}")
    make_document, make_chat, make_problem = GENERATORS[lang]
    rng = {name: random.Random(f"{seed}:{lang}:{name}") for name in FILE_NAMES}
    # r1_val's questions and the README's example, in no other file: distill.py and train_dpo.py report accuracy
    # on them, and the quickstart's last command asks the example
    held_out = {EXAMPLE_QUESTION}
    r1_val = list(new_problems(rng["r1_val"], make_problem, n_val, held_out))
    dpo_questions = set(held_out)  # the pairs may reuse r1's problems (DPO after distillation), not r1_val's

    def make_pair(pair_rng):
        return reasoning_pair(pair_rng, make_problem)

    records = {  # val first: the training records skip its questions
        "pretrain_val": ({"text": make_document(rng["pretrain_val"], held_out)} for _ in range(n_val)),
        "pretrain": documents(rng["pretrain"], make_document, int(pretrain_mb * 1e6), held_out),
        "sft_val": (make_chat(rng["sft_val"]) for _ in range(n_val)),
        "sft": (offered_calculator(rng["sft"], make_chat(rng["sft"])) for _ in range(n_sft)),
        "r1_val": r1_val,
        "r1": new_problems(rng["r1"], lambda r: problem_or_tool_use(r, make_problem), n_r1, set(held_out)),
        "dpo_val": new_problems(rng["dpo_val"], make_pair, n_val, dpo_questions),
        "dpo": new_problems(rng["dpo"], make_pair, n_dpo, dpo_questions),
    }
    paths = {name: write_jsonl(os.path.join(out_dir, name + ".jsonl"), recs) for name, recs in records.items()}
    return {name: paths[name] for name in FILE_NAMES}

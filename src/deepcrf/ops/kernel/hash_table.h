/* Stage 1a: the open-addressing hash table of lattice vertex keys. */
/* ------------------------------------------------------------------ hash table of keys */
/* A vertex key is (r, q_0 .. q_{d-1}) stored as the d lattice coordinates (d+1) q_i + r
 * (densecrf's keys; the last coordinate is implied because they sum to zero). */
typedef struct {
    int d;
    int64_t m, cap_keys; /* vertices, capacity of `keys` (in vertices) */
    int32_t *keys;       /* m * d */
    int64_t *slots;      /* hash slots: vertex index or -1 */
    int64_t nslots;      /* a power of two */
    int failed;
} table_t;

static inline int keys_equal(const int32_t *a, const int32_t *b, int d) {
    for (int i = 0; i < d; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

static inline uint64_t hash_key(const int32_t *k, int d) {
    uint64_t h = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < d; i++) {
        h ^= (uint64_t)(uint32_t)k[i];
        h *= 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
    }
    h ^= h >> 29;
    h *= 0x94D049BB133111EBull;
    h ^= h >> 32;
    return h;
}

static inline int64_t slot_entry(uint64_t hash, int64_t vertex) {
    return (int64_t)(((hash >> 33) << 32) | (uint64_t)vertex);
}

static int table_init(table_t *t, int d, int64_t expected) {
    t->d = d;
    t->m = 0;
    t->failed = 0;
    t->cap_keys = expected > 16 ? expected : 16;
    t->nslots = 32;
    while (t->nslots < 2 * t->cap_keys) t->nslots *= 2;
    t->keys = (int32_t *)malloc(sizeof(int32_t) * (size_t)(t->cap_keys * (d > 0 ? d : 1)));
    t->slots = (int64_t *)malloc(sizeof(int64_t) * (size_t)t->nslots);
    if (!t->keys || !t->slots) return -1;
    memset(t->slots, 0xFF, sizeof(int64_t) * (size_t)t->nslots);
    return 0;
}

static void table_free(table_t *t) {
    free(t->keys);
    free(t->slots);
    t->keys = NULL;
    t->slots = NULL;
}

/* Start loading the slot where the look-up of a key with hash h begins (look-ups of
 * unrelated keys then wait for memory together, not one after another). */
static inline void table_prefetch(const table_t *t, uint64_t h) {
    __builtin_prefetch(&t->slots[h & (uint64_t)(t->nslots - 1)]);
}

static int table_grow(table_t *t) {
    int d = t->d;
    int64_t nslots = t->nslots * 2;
    int64_t *slots = (int64_t *)malloc(sizeof(int64_t) * (size_t)nslots);
    if (!slots) return -1;
    memset(slots, 0xFF, sizeof(int64_t) * (size_t)nslots);
    for (int64_t v = 0; v < t->m; v++) {
        uint64_t h = hash_key(t->keys + v * d, d);
        uint64_t s = h & (uint64_t)(nslots - 1);
        while (slots[s] >= 0) s = (s + 1) & (uint64_t)(nslots - 1);
        slots[s] = slot_entry(h, v);
    }
    free(t->slots);
    t->slots = slots;
    t->nslots = nslots;
    return 0;
}

/* Index of `key` (inserting it when `insert`), or -1 when absent / on allocation failure;
 * h = hash_key(key).  A slot holds the vertex index in its low 32 bits and 31 more bits of
 * the key's hash above them, so most mismatches are rejected without reading the key itself. */
static int64_t table_find(table_t *t, const int32_t *key, uint64_t h, int insert) {
    int d = t->d;
    uint64_t mask = (uint64_t)(t->nslots - 1);
    uint64_t s = h & mask;
    const int64_t tag = slot_entry(h, 0);
    for (;;) {
        int64_t e = t->slots[s];
        if (e < 0) break;
        if ((e & ~(int64_t)0xFFFFFFFF) == tag) {
            int64_t v = e & 0xFFFFFFFF;
            if (keys_equal(t->keys + v * d, key, d)) return v;
        }
        s = (s + 1) & mask;
    }
    if (!insert) return -1;
    if (t->m >= t->cap_keys) {
        int64_t cap = t->cap_keys * 2;
        int32_t *keys = (int32_t *)realloc(t->keys, sizeof(int32_t) * (size_t)(cap * (d > 0 ? d : 1)));
        if (!keys) {
            t->failed = 1;
            return -1;
        }
        t->keys = keys;
        t->cap_keys = cap;
    }
    int64_t v = t->m++;
    memcpy(t->keys + v * d, key, sizeof(int32_t) * (size_t)d);
    t->slots[s] = slot_entry(h, v);
    if (2 * t->m > t->nslots && table_grow(t) != 0) t->failed = 1;
    return v;
}

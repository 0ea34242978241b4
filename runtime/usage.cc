// Usage statistics and their report (CSV, and PNG drawn with cairo).
#include "runtime/usage.h"

#include <cairo.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>

namespace moerun {
namespace {

std::vector<std::string> TaskNames(const ModelConfig& m) {
  std::vector<std::string> names;
  for (const TaskHeadConfig& t : m.modsquad().tasks()) names.push_back(t.name());
  return names;
}

// White -> dark blue as v goes 0 -> 1.
void Colour(double v, double* r, double* g, double* b) {
  v = std::clamp(v, 0.0, 1.0);
  *r = 1.0 - 0.85 * v;
  *g = 1.0 - 0.65 * v;
  *b = 1.0 - 0.25 * v;
}

// A matrix heatmap: rows x cols cells with their values printed, row and column labels, a
// title and a colour scale from 0 to `vmax`.
Status WriteHeatmap(const std::string& path, const std::string& title,
                    const std::vector<std::string>& row_labels,
                    const std::vector<std::string>& col_labels, const std::vector<double>& values,
                    double vmin, double vmax, const char* format, const std::string& col_axis) {
  const int rows = static_cast<int>(row_labels.size()), cols = static_cast<int>(col_labels.size());
  const double cell = 44, left = 130, bottom = 50, right = 30;
  // Wide enough for the title; column labels wider than a cell are drawn at 45 degrees.
  double title_width = 0, label_width = 0;
  {
    cairo_surface_t* scratch = cairo_image_surface_create(CAIRO_FORMAT_RGB24, 1, 1);
    cairo_t* c = cairo_create(scratch);
    cairo_select_font_face(c, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
    cairo_set_font_size(c, 16);
    cairo_text_extents_t e;
    cairo_text_extents(c, title.c_str(), &e);
    title_width = e.x_advance;
    cairo_set_font_size(c, 12);
    for (const std::string& l : col_labels) {
      cairo_text_extents(c, l.c_str(), &e);
      label_width = std::max(label_width, e.x_advance);
    }
    cairo_destroy(c);
    cairo_surface_destroy(scratch);
  }
  const bool slanted = label_width > cell - 6;
  const double top = slanted ? 60 + label_width * 0.72 : 70;
  const int width = static_cast<int>(std::max(left + cols * cell + right, title_width + 40));
  const int height = static_cast<int>(top + rows * cell + bottom);
  cairo_surface_t* surface = cairo_image_surface_create(CAIRO_FORMAT_RGB24, width, height);
  cairo_t* cr = cairo_create(surface);
  cairo_set_source_rgb(cr, 1, 1, 1);
  cairo_paint(cr);
  cairo_select_font_face(cr, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
  auto text = [&](double x, double y, const std::string& s, double size, double align,
                  double rgb = 0.0) {
    cairo_set_font_size(cr, size);
    cairo_text_extents_t e;
    cairo_text_extents(cr, s.c_str(), &e);
    cairo_set_source_rgb(cr, rgb, rgb, rgb);
    cairo_move_to(cr, x - align * e.width - e.x_bearing, y - e.height / 2 - e.y_bearing);
    cairo_show_text(cr, s.c_str());
  };
  text(width / 2.0, 22, title, 16, 0.5);
  if (!slanted) text(left + cols * cell / 2.0, 46, col_axis, 12, 0.5, 0.3);
  for (int c = 0; c < cols; ++c) {
    if (!slanted) {
      text(left + (c + 0.5) * cell, top - 10, col_labels[c], 12, 0.5);
      continue;
    }
    cairo_save(cr);
    cairo_translate(cr, left + (c + 0.5) * cell, top - 8);
    cairo_rotate(cr, -M_PI / 4);
    cairo_set_font_size(cr, 12);
    cairo_set_source_rgb(cr, 0, 0, 0);
    cairo_move_to(cr, 0, 0);
    cairo_show_text(cr, col_labels[c].c_str());
    cairo_restore(cr);
  }
  for (int r = 0; r < rows; ++r) {
    text(left - 8, top + (r + 0.5) * cell, row_labels[r], 13, 1.0);
    for (int c = 0; c < cols; ++c) {
      const double v = values[r * cols + c];
      double red, green, blue;
      const double x = vmax > vmin ? (v - vmin) / (vmax - vmin) : 0;
      Colour(x, &red, &green, &blue);
      cairo_set_source_rgb(cr, red, green, blue);
      cairo_rectangle(cr, left + c * cell, top + r * cell, cell, cell);
      cairo_fill(cr);
      char buf[32];
      std::snprintf(buf, sizeof(buf), format, v);
      text(left + (c + 0.5) * cell, top + (r + 0.5) * cell, buf, 11, 0.5, x > 0.55 ? 1.0 : 0.0);
    }
  }
  cairo_set_source_rgb(cr, 0.6, 0.6, 0.6);
  cairo_set_line_width(cr, 1);
  cairo_rectangle(cr, left, top, cols * cell, rows * cell);
  cairo_stroke(cr);
  // Colour scale.
  const double bar_y = top + rows * cell + 18, bar_w = std::min(200.0, cols * cell);
  for (int i = 0; i < 100; ++i) {
    double red, green, blue;
    Colour(i / 99.0, &red, &green, &blue);
    cairo_set_source_rgb(cr, red, green, blue);
    cairo_rectangle(cr, left + i * bar_w / 100, bar_y, bar_w / 100 + 0.5, 10);
    cairo_fill(cr);
  }
  char lo[32], hi[32];
  std::snprintf(lo, sizeof(lo), format, vmin);
  std::snprintf(hi, sizeof(hi), format, vmax);
  text(left - 6, bar_y + 5, lo, 10, 1.0, 0.3);
  text(left + bar_w + 6, bar_y + 5, hi, 10, 0.0, 0.3);
  cairo_destroy(cr);
  cairo_surface_flush(surface);
  const cairo_status_t st = cairo_surface_write_to_png(surface, path.c_str());
  cairo_surface_destroy(surface);
  if (st != CAIRO_STATUS_SUCCESS) {
    return Status::Error("cannot write " + path + ": " + cairo_status_to_string(st));
  }
  return Status::Ok();
}

Status WriteCsv(const std::string& path, const std::string& corner,
                const std::vector<std::string>& rows, const std::vector<std::string>& cols,
                const std::vector<double>& values, int precision) {
  std::ofstream out(path);
  out << corner;
  for (const std::string& c : cols) out << "," << c;
  out << "\n" << std::fixed << std::setprecision(precision);
  for (size_t r = 0; r < rows.size(); ++r) {
    out << rows[r];
    for (size_t c = 0; c < cols.size(); ++c) out << "," << values[r * cols.size() + c];
    out << "\n";
  }
  out.close();
  if (!out) return Status::Error("cannot write " + path);
  return Status::Ok();
}

}  // namespace

std::vector<LayerUsage> UsageFromBuffers(const ModelConfig& m,
                                         const std::vector<std::pair<std::string, Tensor>>& ema) {
  std::vector<LayerUsage> out;
  for (const auto& [name, t] : ema) {
    LayerUsage u;
    u.layer = name.substr(0, name.size() - std::string(".usage").size());
    u.tasks = static_cast<int>(t.dim(0));
    u.experts = static_cast<int>(t.dim(1));
    u.k = u.layer.find(".attn") != std::string::npos ? m.modsquad().attention_k()
                                                     : m.modsquad().mlp_k();
    u.percent.assign(static_cast<size_t>(u.tasks) * u.experts, 0.0);
    const float* f = t.data<float>();
    for (int task = 0; task < u.tasks; ++task) {
      double sum = 0;
      for (int e = 0; e < u.experts; ++e) sum += f[task * u.experts + e];
      for (int e = 0; e < u.experts; ++e) {
        u.percent[task * u.experts + e] = sum > 0 ? 100.0 * f[task * u.experts + e] / sum : 0;
      }
    }
    out.push_back(u);
  }
  return out;
}

std::vector<double> TaskSimilarity(const std::vector<LayerUsage>& layers) {
  if (layers.empty()) return {};
  const int t = layers[0].tasks;
  std::vector<double> s(static_cast<size_t>(t) * t, 0.0);
  for (const LayerUsage& l : layers) {
    for (int i = 0; i < t; ++i) {
      for (int j = 0; j < t; ++j) {
        for (int e = 0; e < l.experts; ++e) {
          s[i * t + j] += l.percent[i * l.experts + e] / 100 * l.percent[j * l.experts + e] / 100;
        }
      }
    }
  }
  return s;
}

double UsageEntropy(const LayerUsage& l, int task) {
  double h = 0;
  for (int e = 0; e < l.experts; ++e) {
    const double p = l.percent[task * l.experts + e] / 100;
    if (p > 0) h -= p * std::log2(p);
  }
  return h;
}

double MeanTaskEntropy(const std::vector<LayerUsage>& layers) {
  double sum = 0;
  int n = 0;
  for (const LayerUsage& l : layers) {
    for (int t = 0; t < l.tasks; ++t, ++n) sum += UsageEntropy(l, t);
  }
  return n > 0 ? sum / n : 0;
}

Status WriteUsageReport(const ModelConfig& m, const std::vector<LayerUsage>& layers,
                        const std::string& dir, std::vector<std::string>* written) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::Error("cannot create " + dir + ": " + ec.message());
  const std::vector<std::string> tasks = TaskNames(m);
  auto done = [&](const std::string& p) {
    if (written != nullptr) written->push_back(p);
  };
  for (const LayerUsage& l : layers) {
    std::vector<std::string> experts;
    for (int e = 0; e < l.experts; ++e) experts.push_back(std::to_string(e));
    double vmax = 0;
    for (double v : l.percent) vmax = std::max(vmax, v);
    const std::string base = dir + "/usage_" + l.layer;
    MOERUN_RETURN_IF_ERROR(WriteCsv(base + ".csv", "task", tasks, experts, l.percent, 2));
    done(base + ".csv");
    std::ostringstream title;
    title << std::fixed << std::setprecision(2) << m.name() << "  " << l.layer
          << ": expert usage (%), top-" << l.k << ", mean entropy " << MeanTaskEntropy({l})
          << " bits";
    MOERUN_RETURN_IF_ERROR(WriteHeatmap(base + ".png", title.str(), tasks, experts, l.percent, 0,
                                        vmax, "%.0f", "expert"));
    done(base + ".png");
  }
  const std::vector<double> s = TaskSimilarity(layers);
  if (!s.empty()) {
    MOERUN_RETURN_IF_ERROR(WriteCsv(dir + "/task_similarity.csv", "task", tasks, tasks, s, 4));
    done(dir + "/task_similarity.csv");
    const double vmin = *std::min_element(s.begin(), s.end());
    const double vmax = *std::max_element(s.begin(), s.end());
    MOERUN_RETURN_IF_ERROR(WriteHeatmap(dir + "/task_similarity.png",
                                        m.name() + ": task similarity (sum over layers)", tasks,
                                        tasks, s, vmin, vmax, "%.2f", "task"));
    done(dir + "/task_similarity.png");
  }
  return Status::Ok();
}

}  // namespace moerun
